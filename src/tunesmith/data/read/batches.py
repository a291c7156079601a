"""The input as a stream of batches: the rows of ``readers.file_rows`` (JSONL and CSV line by line, Parquet and
saved HF datasets through Arrow, one JSON document whole), or of ``read_source`` for documents and hub datasets.

Rows keep ``file:line`` (``file:row N`` for Arrow formats) and a malformed row becomes a ``Rejected`` entry
(or a ``DataError`` under ``on_error: fail``); only the current batch is held. ``data prepare`` streams the
whole input (:func:`stream_source`); ``tunesmith init`` reads its first rows the same way (:func:`read_sample`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from tunesmith.data.read.readers import collect, counted, encoding_note, file_rows
from tunesmith.data.read.sources import _looks_like_documents, check_derive, derive_fields, read_source
from tunesmith.records import Record, Rejected

FIRST_BATCH = 1_000  # small, so that the first progress line comes within a second


@dataclass
class Batch:
    records: list[Record]
    rejected: list[Rejected]
    fraction: float  # share of the input read so far (for the ETA)
    order: list[str] = field(default_factory=list)  # every item's file:line in read order (rows and rejects)

    def rank(self) -> dict[str, int]:
        """Each item's place in read order, by its file:line: what set-aside rows are written in."""
        return {src: k for k, src in enumerate(self.order)}


def stream_source(cfg, tokenizer: Callable | None = None) -> Iterator[Batch]:
    """Batches of ``data.path`` / ``data.hub`` (up to ``data.batch_rows`` rows, the first ones smaller) with
    ``data.derive`` fields added (their fields checked over the whole stream); ``data.limit`` rows at most."""
    items, fraction = source_items(cfg, tokenizer, cfg.batch_rows)
    seen: set[str] = set()
    for batch in in_batches(items, fraction, cfg.on_error, cfg.batch_rows, cfg.limit):
        if cfg.derive and batch.records:
            seen.update(*(r.data for r in batch.records))
            derive_fields(batch.records, cfg.derive, check=False)
        yield batch
    if cfg.derive:
        check_derive(seen, cfg.derive)


def in_batches(items: Iterator, fraction: Callable[[], float], on_error: str, batch_rows: int,
               limit: int | None = None) -> Iterator[Batch]:
    """Records and rejects gathered into batches of up to ``batch_rows`` (the first ones smaller, growing
    fourfold); ``limit`` records at most."""
    size, left = min(FIRST_BATCH, batch_rows), limit
    while left is None or left > 0:
        order: list[str] = []
        records, rejected = collect(_noted(islice(items, size), order), on_error, left)
        if not records and not rejected:
            return
        if left is not None:
            left -= len(records)
        yield Batch(records, rejected, 1.0 if left == 0 else fraction(), order)
        size = min(size * 4, batch_rows)


def _noted(items, order: list[str]):
    for item in items:
        order.append(item.source)
        yield item


def source_items(cfg, tokenizer, batch_rows: int) -> tuple[Iterator, Callable[[], float]]:
    """Records and rejects one at a time, and a function telling the share of the input read so far."""
    path = Path(cfg.path) if cfg.path is not None else None
    whole = cfg.hub is not None and (path is None or cfg.format == "hf_hub")
    if not whole and cfg.format != "documents" and not _looks_like_documents(path):
        split = cfg.hub.split if cfg.hub else "train"
        return file_rows(path, cfg.format, cfg.on_error == "skip", split, batch_rows)
    records, rejected = read_source(cfg.model_copy(update={"derive": {}, "limit": None}), tokenizer)
    return counted(iter([*rejected, *records]), len(records) + len(rejected))


@dataclass
class Sample:
    """The first rows of a data file, read as the data stage reads them under ``on_error: skip``."""

    records: list[Record]
    rejected: list[Rejected]  # unreadable rows (broken lines, bytes that are not text), each with its file:line
    complete: bool  # the whole file was read
    note: str | None  # the encoding the file was decoded from, when it is not UTF-8 (as data prepare says it)


def read_sample(path: Path, fmt: str = "auto", rows: int = 20_000, batch_rows: int = 20_000) -> Sample:
    """At most ``rows`` rows (read and rejected together) from the start of ``path``: enough to tell what its
    fields are without holding a large file in memory. ``complete`` says whether the file ended within them."""
    path = Path(path)
    note = encoding_note(path)
    items, fraction = file_rows(path, fmt, lenient=True, batch_rows=batch_rows)
    records: list[Record] = []
    rejected: list[Rejected] = []
    try:
        for batch in in_batches(items, fraction, "skip", batch_rows, limit=rows):
            records += batch.records
            rejected += batch.rejected
            if len(records) + len(rejected) >= rows:
                break
        complete = next(items, None) is None
    finally:
        items.close()
    return Sample(records, rejected, complete, note)
