"""The input as a stream of batches: JSONL and CSV line by line, Parquet and saved HF datasets through Arrow.

Rows keep ``file:line`` (``file:row N`` for Arrow formats) and a malformed row becomes a ``Rejected`` entry
(or a ``DataError`` under ``on_error: fail``) exactly as ``readers.py`` words it; only the current batch is
held. Formats read whole by nature (one JSON document, SQuAD, documents, hub datasets) are read by
``read_source`` and handed on in batches.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from tunesmith.data.readers import (
    CSV_FIELD_LIMIT,
    _hf_disk,
    collect,
    csv_row,
    detect_format,
    file_encoding,
    jsonl_row,
)
from tunesmith.data.sources import _looks_like_documents, derive_fields, read_source
from tunesmith.errors import DataError
from tunesmith.records import Record, Rejected

FIRST_BATCH = 1_000  # small, so that the first progress line comes within a second


@dataclass
class Batch:
    records: list[Record]
    rejected: list[Rejected]
    fraction: float  # share of the input read so far (for the ETA)


def stream_source(cfg, tokenizer: Callable | None = None) -> Iterator[Batch]:
    """Batches of ``data.path`` / ``data.hub`` (up to ``data.batch_rows`` rows, the first ones smaller) with
    ``data.derive`` fields added; ``data.limit`` rows at most."""
    items, fraction = _items(cfg, tokenizer, cfg.batch_rows)
    size, left = min(FIRST_BATCH, cfg.batch_rows), cfg.limit
    while left is None or left > 0:
        records, rejected = collect(islice(items, size), cfg.on_error, left)
        if not records and not rejected:
            return
        if cfg.derive and records:
            derive_fields(records, cfg.derive)
        if left is not None:
            left -= len(records)
        yield Batch(records, rejected, 1.0 if left == 0 else fraction())
        size = min(size * 4, cfg.batch_rows)


def _items(cfg, tokenizer, batch_rows: int) -> tuple[Iterator, Callable[[], float]]:
    """Records and rejects one at a time, and a function telling the share of the input read so far."""
    path = Path(cfg.path) if cfg.path is not None else None
    whole = cfg.hub is not None and (path is None or cfg.format == "hf_hub")
    fmt = None if whole else ("documents" if cfg.format == "documents" else None)
    if not whole and fmt is None and not _looks_like_documents(path):
        fmt = detect_format(path, cfg.format)
    if fmt in ("jsonl", "csv"):
        if not path.is_file():
            raise DataError(f"Data file not found: {path}")
        lines = LineReader(path, lenient=cfg.on_error == "skip")
        return (_jsonl if fmt == "jsonl" else _csv)(path, lines), lines.fraction
    if fmt == "parquet":
        return _counted(_parquet(path, batch_rows))
    if fmt == "hf_disk":  # the rows are read from the memory-mapped Arrow files one at a time
        split = cfg.hub.split if cfg.hub else "train"
        return _counted(_hf_disk(path, split), _hf_rows(path, split))
    records, rejected = read_source(cfg.model_copy(update={"derive": {}, "limit": None}), tokenizer)
    return _counted(iter([*rejected, *records]), len(records) + len(rejected))


def _counted(items, total: int | None = None):
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


class LineReader:
    """A text file's lines as ``(line number, text)``, decoded one at a time (UTF-8, a BOM allowed).

    ``lenient`` keeps undecodable bytes as surrogates so that their rows can be rejected; otherwise they
    raise a ``DataError`` naming the line and byte offset."""

    def __init__(self, path: Path, lenient: bool):
        self.path, self.lenient = path, lenient
        self.size = max(path.stat().st_size, 1)
        self.offset = 0

    def fraction(self) -> float:
        return min(self.offset / self.size, 1.0)

    def __iter__(self) -> Iterator[tuple[int, str]]:
        encoding = file_encoding(self.path)
        if encoding != "utf-8":  # UTF-16 or Korean cp949, as the readers decode them (encoding_note says so)
            with open(self.path, encoding=encoding, newline="") as fh:
                for lineno, text in enumerate(fh, start=1):
                    yield lineno, text
                    self.offset += len(text.encode(encoding, errors="replace"))
            return
        with open(self.path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                yield lineno, self._decode(raw, lineno)
                self.offset += len(raw)

    def _decode(self, raw: bytes, lineno: int) -> str:
        codec = "utf-8-sig" if lineno == 1 else "utf-8"
        try:
            return raw.decode(codec)
        except UnicodeDecodeError as exc:
            if self.lenient:
                return raw.decode(codec, errors="surrogateescape")
            raise DataError(
                f"{self.path}:{lineno}: bytes that are not UTF-8 at offset {self.offset + exc.start}; "
                "re-save the file as UTF-8"
            ) from None


def _jsonl(path: Path, lines: LineReader):
    blank = True
    for lineno, line in lines:
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        blank = False
        yield jsonl_row(f"{path}:{lineno}", line)
    if blank:
        raise DataError(f"{path}: the file is empty")


def _csv(path: Path, lines: LineReader):
    numbered = iter(lines)
    current = {"line": 0}

    def texts():
        for lineno, text in numbered:
            current["line"] = lineno
            yield text

    csv.field_size_limit(CSV_FIELD_LIMIT)  # long documents in a cell, as the readers allow
    reader = csv.reader(texts(), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
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


def _parquet(path: Path, batch_rows: int):
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"Data file not found: {path}")
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


def _hf_rows(path: Path, split: str) -> int:
    """How many rows the saved dataset's split has (0 when it cannot be read: the reader says why)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
        return len(ds[split] if isinstance(ds, datasets.DatasetDict) else ds)
    except Exception:
        return 0
