"""Rows of one data file, one at a time: JSONL and CSV/TSV line by line, Parquet by Arrow batches, JSON (SQuAD/KorQuAD
flattened) as one document, saved HF datasets from their memory-mapped files.

Documents (PDF/TXT/Markdown) and hub datasets live in ``sources.py``; ``batches.py`` hands these rows on in
batches (``data prepare``, ``tunesmith init``) and :func:`read_records` collects them (the commands that want
every row at once), so every command reads a file alike.

Each reader yields ``Record``s that remember ``file:line``; a malformed row either raises a
``DataError`` naming file, line and the start of the line (``on_error="fail"``) or becomes a
``Rejected`` entry with the reason (``on_error="skip"``). Nothing is dropped silently.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from tunesmith.data.formats.chat import check_example, hint
from tunesmith.errors import DataError
from tunesmith.records import Record, Rejected

CSV_FIELD_LIMIT = 2**31 - 1
FIX_HINT = "Fix the row, or set data.on_error: skip to set it aside."
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv", ".json": "json",
           ".parquet": "parquet", ".pq": "parquet"}
ARROW_BATCH = 20_000  # Parquet rows decoded at a time


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "hf_disk"
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise DataError(
            f"{path}: cannot tell the format from the extension '{path.suffix}'; set data.format "
            f"to one of {sorted(set(FORMATS.values()))}"
        ) from None


def read_records(path: Path, fmt: str = "auto", on_error: str = "fail", limit: int | None = None):
    """Read a data file (every row in memory). Returns ``(records, rejected)``."""
    items, _ = file_rows(Path(path), fmt, lenient=on_error == "skip")
    return collect(items, on_error, limit)


Rows = tuple[Iterator[Record | Rejected], Callable[[], float]]


def file_rows(path: Path, fmt: str = "auto", lenient: bool = False, split: str = "train",
              batch_rows: int = ARROW_BATCH) -> Rows:
    """The rows of a data file one at a time, and a function telling the share of the file read so far.

    ``lenient`` keeps bytes that are not UTF-8 so that their rows become rejects (``on_error: skip``);
    ``split`` picks the split of a saved ``DatasetDict``."""
    fmt = detect_format(path, fmt)
    if fmt == "hf_disk":  # the rows are read from the memory-mapped Arrow files one at a time
        return counted(_hf_disk(path, split), _hf_rows(path, split))
    if not path.is_file():
        raise DataError(f"Data file not found: {path}")
    if fmt in ("jsonl", "csv"):
        lines = LineReader(path, lenient)
        return (_jsonl if fmt == "jsonl" else _csv)(path, lines), lines.fraction
    if fmt == "parquet":
        return counted(_parquet(path, batch_rows))
    if fmt in ("json", "squad"):  # one document: read whole by nature
        items = list(_json(path, _read_text(path)))
        return counted(iter(items), len(items))
    raise DataError(f"{path}: data.format {fmt} is not a data file format; choose one of "
                    f"{sorted(set(FORMATS.values()))} or hf_disk")


def counted(items, total: int | None = None) -> Rows:
    """Items with a fraction read of ``total`` (or of the ``(item, fraction)`` pairs a reader yields)."""
    state = {"done": 0, "fraction": 0.0}

    def gen():
        for item in items:
            if isinstance(item, tuple):
                item, state["fraction"] = item
            state["done"] += 1
            yield item

    def fraction() -> float:
        return state["done"] / total if total else state["fraction"]

    return gen(), fraction


def collect(items, on_error: str = "fail", limit: int | None = None):
    """Split a stream of ``Record``/``Rejected`` into two lists; under ``fail`` the first reject raises."""
    records: list[Record] = []
    rejected: list[Rejected] = []
    for item in items:
        if isinstance(item, Rejected):
            if on_error == "fail":
                raise DataError(f"{item.source}: {item.reason}. {FIX_HINT}")
            rejected.append(item)
            continue
        records.append(item)
        if limit is not None and len(records) >= limit:
            break
    return records, rejected


def _read_text(path: Path) -> str:
    """A JSON document's text: UTF-8, or UTF-16 / cp949 (Korean Windows, euc-kr's superset) when its bytes say so
    (:func:`encoding_note` says which). Other bytes that are not UTF-8 raise, naming the line and the fix."""
    raw = path.read_bytes()
    encoding = detect_encoding(raw)
    if encoding != "utf-8":
        text = raw.decode(encoding)
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise DataError(f"{path}:{line}: bytes that are not UTF-8 at offset {exc.start}; "
                            f"{resave_hint(path)}") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text


def detect_encoding(raw: bytes) -> str:
    """``utf-16`` (a byte-order mark), ``cp949`` (not UTF-8, but Korean under cp949/euc-kr) or ``utf-8``
    (including files that are not valid UTF-8: those are refused or rejected by line)."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    try:
        raw.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        text = raw.decode("cp949")
    except UnicodeDecodeError:
        return "utf-8"
    wide = [c for c in text if not c.isascii()]
    hangul = sum("\uac00" <= c <= "\ud7a3" for c in wide)
    return "cp949" if wide and hangul >= len(wide) / 2 else "utf-8"


HEAD_BYTES = 1 << 20  # how much of a file decides its encoding when it is read as a stream


def file_encoding(path: Path) -> str:
    """:func:`detect_encoding` on the file's first MiB (a character cut at its end is not a decoding error)."""
    with open(path, "rb") as fh:
        head = fh.read(HEAD_BYTES)
    if len(head) == HEAD_BYTES and not head.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start >= len(head) - 3:
                head = head[: exc.start]
    return detect_encoding(head)


def encoding_note(path: Path) -> str | None:
    """A line saying the file was decoded from UTF-16 or cp949 (None for UTF-8 and non-text formats)."""
    path = Path(path)
    if not path.is_file() or detect_format(path) not in ("jsonl", "csv", "json", "squad"):
        return None
    encoding = file_encoding(path)
    if encoding == "utf-8":
        return None
    return f"{path}: decoded as {encoding.upper()} (not UTF-8); the prepared data is written as UTF-8"


def resave_hint(path: Path) -> str:
    """The fix for a file that is not UTF-8: how to re-save it, naming the encoding it most likely is in."""
    return (f"re-save the file as UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name} "
            "(for Windows Western text use -f cp1252; UTF-16 and Korean cp949/euc-kr files are read as they are)")


_BAD_BYTES = re.compile("[\udc80-\udcff]")
NOT_UTF8 = "bytes that are not UTF-8 (shown as \ufffd); re-save the file as UTF-8"


def _shown(text: str) -> str:
    """Text with undecodable bytes replaced by U+FFFD, so that it can be written out as JSON."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _start(line: str, n: int = 60) -> str:
    line = line.strip()
    return line if len(line) <= n else line[:n] + "..."


class LineReader:
    """A text file's lines as ``(line number, text)``, decoded one at a time: UTF-8 (a BOM allowed), or UTF-16 /
    Korean cp949 when :func:`file_encoding` says so.

    ``lenient`` keeps undecodable bytes as surrogates so that their rows can be rejected; otherwise they
    raise a ``DataError`` naming the line, the byte offset and the fix. ``start``/``end`` read only the lines that
    begin in that byte range of a UTF-8 file (the Ray engine's shards), numbered after ``newlines_before``, the
    newlines in the bytes before ``start``."""

    def __init__(self, path: Path, lenient: bool, start: int = 0, end: int | None = None, newlines_before: int = 0):
        self.path, self.lenient = path, lenient
        self.size = max(path.stat().st_size, 1)
        self.offset, self.start, self.end, self.newlines_before = 0, start, end, newlines_before

    def fraction(self) -> float:
        return min(self.offset / self.size, 1.0)

    def __iter__(self) -> Iterator[tuple[int, str]]:
        encoding = file_encoding(self.path)
        if encoding != "utf-8":  # UTF-16 or Korean cp949 (encoding_note says so)
            with open(self.path, encoding=encoding, newline="") as fh:
                for lineno, text in enumerate(fh, start=1):
                    yield lineno, text
                    self.offset += len(text.encode(encoding, errors="replace"))
            return
        with open(self.path, "rb") as fh:
            first = 1 + self.newlines_before
            if self.start:  # the line that began before the range belongs to the shard before
                fh.seek(self.start - 1)
                partial = fh.readline()
                first += len(partial) >= 2 and partial.endswith(b"\n")
                self.offset = self.start - 1 + len(partial)
            for lineno, raw in enumerate(fh, start=first):
                if self.end is not None and self.offset >= self.end:
                    return
                yield lineno, self._decode(raw, lineno)
                self.offset += len(raw)

    def _decode(self, raw: bytes, lineno: int) -> str:
        codec = "utf-8-sig" if lineno == 1 else "utf-8"
        try:
            return raw.decode(codec)
        except UnicodeDecodeError as exc:
            if self.lenient:
                return raw.decode(codec, errors="surrogateescape")
            raise DataError(f"{self.path}:{lineno}: bytes that are not UTF-8 at offset {self.offset + exc.start}; "
                            f"{resave_hint(self.path)}") from None


def _jsonl(path: Path, lines: LineReader, whole: bool = True):
    """Rows of JSON lines (blank lines skipped); ``whole``: the lines are the whole file, which must have one."""
    blank = whole
    for lineno, line in lines:
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        blank = False
        yield jsonl_row(f"{path}:{lineno}", line)
    if blank:
        raise DataError(f"{path}: the file is empty")


def jsonl_row(where: str, line: str) -> Record | Rejected:
    """One JSONL line: a ``Record`` of its object, or a ``Rejected`` saying what is wrong with it."""
    if _BAD_BYTES.search(line):
        return Rejected(where, "read", NOT_UTF8, _shown(line))
    try:
        obj = _loads(line)
    except json.JSONDecodeError as exc:
        return Rejected(where, "read", f"not valid JSON ({exc.msg}); line starts with: {_start(line)!r}", line)
    if not isinstance(obj, dict):
        return Rejected(where, "read", f"not a JSON object; line starts with: {_start(line)!r}", line)
    if "messages" in obj and (errors := check_example(obj)):  # an OpenAI chat example: OpenAI's rules
        return Rejected(where, "read", "; ".join(f"{e} ({hint(e)})" for e in errors), obj)
    return Record(obj, where)


try:
    import orjson
except ImportError:  # optional: the standard parser alone gives the same values
    orjson = None
_LONG_INT = re.compile(r"\d{20}")


def _loads(line: str):
    """``json.loads``, through orjson where it gives the same value (it refuses NaN, infinities and lone
    surrogates, and reads integers beyond 64 bits as floats: those lines, and every error, go to ``json``)."""
    if orjson is not None and not _LONG_INT.search(line):
        try:
            return orjson.loads(line)
        except orjson.JSONDecodeError:
            pass
    return json.loads(line)


def csv_row(where: str, header: list[str], row: list[str]) -> Record | Rejected:
    """One CSV row under ``header``: a ``Record``, or a ``Rejected`` saying what is wrong with it."""
    if any(_BAD_BYTES.search(cell) for cell in row):
        return Rejected(where, "read", NOT_UTF8, [_shown(c) for c in row])
    if len(row) != len(header):
        return Rejected(where, "read", f"has {len(row)} fields but the header has {len(header)}", row)
    return Record(dict(zip(header, row, strict=True)), where)


def csv_delimiter(path: Path, header: str) -> str:
    """The field separator of a CSV file, from its header line: a tab for .tsv; else the one of ``,`` ``;`` tab
    ``|`` that the header (outside quotes) holds most often (Excel writes ``;`` where the decimal mark is a comma),
    ``,`` when it holds none."""
    if path.suffix.lower() == ".tsv":
        return "\t"
    bare = re.sub(r'"[^"]*"', "", header)
    counts = {d: bare.count(d) for d in (",", ";", "\t", "|")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _csv(path: Path, lines: LineReader):
    numbered = iter(lines)
    first = next(numbered, None)
    if first is None:
        raise DataError(f"{path}: the file is empty")
    delimiter = csv_delimiter(path, first[1])
    numbered = itertools.chain([first], numbered)
    current = {"line": 0}

    def texts():
        for lineno, text in numbered:
            current["line"] = lineno
            yield text

    csv.field_size_limit(CSV_FIELD_LIMIT)  # the default (131,072 characters) refuses long documents in a cell
    reader = csv.reader(texts(), delimiter=delimiter)
    header = next(reader, None)
    if not header:
        raise DataError(f"{path}: the file is empty")
    if len(set(header)) != len(header):
        yield Rejected(f"{path}:1", "read", f"duplicate column names in header {header}")
        return
    start = current["line"]
    for row in reader:
        where, start = f"{path}:{start + 1}", current["line"]
        if row:
            yield csv_row(where, header, row)


def _json(path: Path, text: str):
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if is_squad(doc):
        yield from flatten_squad(path, doc)
        return
    if isinstance(doc, dict):
        lists = [k for k, v in doc.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON array of objects, or an object with one list of them")
        doc = doc[lists[0]]
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(doc).__name__}")
    for i, obj in enumerate(doc):
        where = f"{path}:[{i}]"
        if not isinstance(obj, dict):
            yield Rejected(where, "read", f"item {i} is not a JSON object", obj)
            continue
        yield Record(obj, where)


def is_squad(doc) -> bool:
    """SQuAD/KorQuAD layout: ``{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}``."""
    data = doc.get("data") if isinstance(doc, dict) else None
    return bool(data) and isinstance(data, list) and isinstance(data[0], dict) and "paragraphs" in data[0]


def squad_questions(path: Path, doc: dict):
    """Every question of a SQuAD/KorQuAD document in file order, as ``(where, id, article, paragraph, qa)``:
    ``where`` names its place (``PATH:data[a].paragraphs[p].qas[q]``), ``id`` is the one it would get
    without its own (``a-p-q``). The one walk over the layout; each reader checks what it needs."""
    for a, article in enumerate(doc["data"]):
        for p, para in enumerate(article.get("paragraphs") or []):
            for q, qa in enumerate(para.get("qas") or []):
                yield f"{path}:data[{a}].paragraphs[{p}].qas[{q}]", f"{a}-{p}-{q}", article, para, qa


def flatten_squad(path: Path, doc: dict):
    """One record per question: id, title, context, question, answers, answer (the first), answer_starts."""
    for where, position, article, para, qa in squad_questions(path, doc):
        if not isinstance(qa, dict) or "question" not in qa or "context" not in para:
            reason = "question without 'question', or paragraph without 'context'"
            yield Rejected(where, "read", reason, qa)
            continue
        answers = qa.get("answers") or []
        yield Record({
            "id": str(qa.get("id", position)), "title": article.get("title", ""),
            "context": para["context"], "question": qa["question"],
            "answers": [x.get("text", "") for x in answers],
            "answer": answers[0].get("text", "") if answers else "",
            "answer_starts": [x.get("answer_start") for x in answers],
        }, where)


def _hf_disk(path: Path, split: str = "train"):
    """A folder written by ``Dataset.save_to_disk`` (or a DatasetDict; ``split`` picks one)."""
    if not path.is_dir():
        raise DataError(f"Dataset folder not found: {path}")
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: not a saved Hugging Face dataset folder ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split '{split}'; splits: {sorted(ds)}")
        ds = ds[split]
    if len(ds) == 0:
        raise DataError(f"{path}: the dataset has no rows")
    for i, row in enumerate(ds):
        yield Record(dict(row), f"{path}:row {i + 1}")


def _hf_rows(path: Path, split: str) -> int:
    """How many rows the saved dataset's split has (0 when it cannot be read: the reader says why)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
        return len(ds[split] if isinstance(ds, datasets.DatasetDict) else ds)
    except Exception:
        return 0


def _parquet(path: Path, batch_rows: int):
    """``(record, fraction read)`` pairs, decoded ``batch_rows`` rows at a time."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    total = pf.metadata.num_rows
    if total == 0:
        raise DataError(f"{path}: the file is empty (0 rows)")
    i = 0
    for batch in pf.iter_batches(batch_size=batch_rows):
        for row in batch.to_pylist():
            i += 1
            yield Record(row, f"{path}:row {i}"), i / total
