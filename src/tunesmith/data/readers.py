"""Readers for JSONL, CSV/TSV, JSON (SQuAD/KorQuAD flattened), Parquet and saved HF datasets.

Documents (PDF/TXT/Markdown) and hub datasets live in ``sources.py``.

Each reader yields ``Record``s that remember ``file:line``; a malformed row either raises a
``DataError`` naming file, line and the start of the line (``on_error="fail"``) or becomes a
``Rejected`` entry with the reason (``on_error="skip"``). Nothing is dropped silently.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from tunesmith.data.chat import check_example, hint
from tunesmith.errors import DataError
from tunesmith.records import Record, Rejected

CSV_FIELD_LIMIT = 2**31 - 1
FIX_HINT = "Fix the row, or set data.on_error: skip to set it aside."
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv", ".json": "json",
           ".parquet": "parquet", ".pq": "parquet"}


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
    """Read a data file. Returns ``(records, rejected)``."""
    path = Path(path)
    fmt = detect_format(path, fmt)
    if fmt == "hf_disk":
        items = _hf_disk(path)
    elif not path.is_file():
        raise DataError(f"Data file not found: {path}")
    elif fmt == "parquet":
        items = _parquet(path)
    else:
        text = _read_text(path, lenient=on_error == "skip" and fmt in ("jsonl", "csv"))
        if not text.strip():
            raise DataError(f"{path}: the file is empty")
        items = {"jsonl": _jsonl, "csv": _csv, "json": _json, "squad": _json}[fmt](path, text)
    return collect(items, on_error, limit)


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


def _read_text(path: Path, lenient: bool = False) -> str:
    """The file's text: UTF-8, or UTF-16 / cp949 (Korean Windows, euc-kr's superset) when its bytes say so
    (:func:`encoding_note` says which). Other bytes that are not UTF-8 raise, naming the line and the fix;
    ``lenient`` keeps them as surrogates so their rows can be rejected."""
    raw = path.read_bytes()
    encoding = detect_encoding(raw)
    if encoding != "utf-8":
        return raw.decode(encoding)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if lenient:
            return raw.decode("utf-8-sig", errors="surrogateescape")
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: bytes that are not UTF-8 at offset {exc.start}; {resave_hint(path)}") from None


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


def _jsonl(path: Path, text: str):
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield jsonl_row(f"{path}:{lineno}", line)


def jsonl_row(where: str, line: str) -> Record | Rejected:
    """One JSONL line: a ``Record`` of its object, or a ``Rejected`` saying what is wrong with it."""
    if _BAD_BYTES.search(line):
        return Rejected(where, "read", NOT_UTF8, _shown(line))
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return Rejected(where, "read", f"not valid JSON ({exc.msg}); line starts with: {_start(line)!r}", line)
    if not isinstance(obj, dict):
        return Rejected(where, "read", f"not a JSON object; line starts with: {_start(line)!r}", line)
    if "messages" in obj and (errors := check_example(obj)):  # an OpenAI chat example: OpenAI's rules
        return Rejected(where, "read", "; ".join(f"{e} ({hint(e)})" for e in errors), obj)
    return Record(obj, where)


def _csv(path: Path, text: str):
    csv.field_size_limit(CSV_FIELD_LIMIT)  # the default (131,072 characters) refuses long documents in a cell
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    if len(set(header)) != len(header):
        yield Rejected(f"{path}:1", "read", f"duplicate column names in header {header}")
        return
    start_line = reader.line_num
    for row in reader:
        where = f"{path}:{start_line + 1}"
        start_line = reader.line_num
        if row:
            yield csv_row(where, header, row)


def csv_row(where: str, header: list[str], row: list[str]) -> Record | Rejected:
    """One CSV row under ``header``: a ``Record``, or a ``Rejected`` saying what is wrong with it."""
    if any(_BAD_BYTES.search(cell) for cell in row):
        return Rejected(where, "read", NOT_UTF8, [_shown(c) for c in row])
    if len(row) != len(header):
        return Rejected(where, "read", f"has {len(row)} fields but the header has {len(header)}", row)
    return Record(dict(zip(header, row, strict=True)), where)


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


def _parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: the file is empty (0 rows)")
    for i, row in enumerate(table.to_pylist()):
        yield Record(row, f"{path}:row {i + 1}")


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
