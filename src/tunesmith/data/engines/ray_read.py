"""Reading on the Ray engine's workers: the input cut into shards, each read by a worker into parts of up to
``data.batch_rows`` rows, with the ``file:line``, the ``on_error`` handling and the derived fields of the local
readers (``batches.py``, ``readers.py``).

A UTF-8 JSONL file is cut into byte ranges (a shard reads the lines that begin in its range; a first pass counts
each range's newlines so that every shard numbers its lines); any other source is one shard, read whole by one
worker and cut into parts there. A row's read position is ``(shard << 32) + its place in the shard``: sorted,
the positions read as the file does. The driver reads only the file's size and its first MiB.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, replace
from pathlib import Path

from tunesmith.data.engines.ray_parts import Part, dump, node
from tunesmith.data.read.batches import in_batches, source_items
from tunesmith.data.read.readers import LineReader, _jsonl, detect_format, file_encoding
from tunesmith.data.read.sources import derive_fields
from tunesmith.data.steps.curation import StepContext

SHARD_BYTES = 1 << 20  # the smallest byte range worth a task


@dataclass(frozen=True)
class Shard:
    """A byte range of the input (``end`` None: the whole source, read as the local engine reads it)."""

    index: int
    start: int = 0
    end: int | None = None
    newlines_before: int = 0


def plan(cfg) -> list[Shard]:
    """Byte ranges of about ``data.batch_rows`` lines (at least ``SHARD_BYTES``) for a UTF-8 JSONL file; else one
    shard."""
    path = Path(cfg.path) if cfg.path is not None else None
    if not _by_bytes(cfg, path):
        return [Shard(0)]
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(1 << 20)
    per_line = len(head) / max(1, head.count(b"\n"))
    n = max(1, -(-size // max(SHARD_BYTES, int(per_line * cfg.batch_rows))))
    return [Shard(k, k * size // n, (k + 1) * size // n) for k in range(n)]


def _by_bytes(cfg, path: Path | None) -> bool:
    whole_hub = cfg.hub is not None and (path is None or cfg.format == "hf_hub")
    return (path is not None and not whole_hub and cfg.limit is None and path.is_file()
            and detect_format(path, cfg.format) == "jsonl" and file_encoding(path) == "utf-8")


def count_newlines(path: str, start: int, end: int) -> int:
    """Newlines in ``[start, end)`` of the file (a worker's pass, so that each shard can number its lines)."""
    n, left = 0, end - start
    with open(path, "rb") as fh:
        fh.seek(start)
        while left > 0:
            chunk = fh.read(min(left, 1 << 24))
            if not chunk:
                break
            n += chunk.count(b"\n")
            left -= len(chunk)
    return n


def numbered(shards: list[Shard], counts: list[int]) -> list[Shard]:
    """The shards with the newlines before each (the counts of the ranges before it)."""
    before, out = 0, []
    for shard, count in zip(shards, counts, strict=True):
        out.append(replace(shard, newlines_before=before))
        before += count
    return out


def shard_table(shards: list[Shard]):
    import pyarrow as pa

    return pa.table({"shard": pa.array([pickle.dumps(s) for s in shards], pa.binary())})


def read_parts(table, cfg, ctx: StepContext, profile_dir: str | None):
    """Ray Data ``map_batches`` over shards: each shard's parts, one block each."""
    for shard in [pickle.loads(b) for b in table.column("shard").to_pylist()]:
        for part in read_shard(shard, cfg, ctx, profile_dir):
            yield dump([part])


def read_shard(shard: Shard, cfg, ctx: StepContext, profile_dir: str | None):
    """One shard's rows and rejects in parts; with ``profile_dir``, each part's profile sketch is written there
    (``ProfileSketch``, merged later by one worker)."""
    path = Path(cfg.path) if cfg.path is not None else None
    if shard.end is None:
        items, _ = source_items(cfg, ctx.tok, cfg.batch_rows)
    else:
        lines = LineReader(path, cfg.on_error == "skip", shard.start, shard.end, shard.newlines_before)
        items = _jsonl(path, lines, whole=False)
    base, read, here = shard.index << 32, 0, node()
    for b, batch in enumerate(in_batches(items, lambda: 0.0, cfg.on_error, cfg.batch_rows, cfg.limit)):
        at = {src: base + read + k for k, src in enumerate(batch.order)}
        start, read = base + read, read + len(batch.order)
        raw = set().union(*(r.data for r in batch.records)) if batch.records else set()
        if cfg.derive and batch.records:
            derive_fields(batch.records, cfg.derive, check=False)
        if profile_dir is not None:
            _sketch_of(batch.records, cfg, ctx, Path(profile_dir) / f"{shard.index:08d}-{b:06d}.sketch")
        yield Part(start, [at[r.source] for r in batch.records], batch.records,
                   [(at[r.source], r) for r in batch.rejected], n_read=len(batch.order), raw_fields=raw, nodes={here})


def _sketch_of(records: list, cfg, ctx: StepContext, where: Path) -> None:
    from tunesmith.data.profile import sketch_for

    sketch = sketch_for(cfg, ctx.tok)
    sketch.add(records)
    sketch.tokenizer = None  # the sketch travels without it
    with open(where, "wb") as fh:
        pickle.dump(sketch, fh, protocol=pickle.HIGHEST_PROTOCOL)


def merge_sketches(cfg, ctx: StepContext, folder: str, profile_dir: str, limits) -> None:
    """One worker: every part's profile sketch merged in read order, and the profile written."""
    from tunesmith.data.profile import sketch_for

    sketch = sketch_for(cfg, ctx.tok)
    for path in sorted(Path(folder).glob("*.sketch")):
        with open(path, "rb") as fh:
            sketch.merge(pickle.load(fh))
    sketch.write(Path(profile_dir), limits=limits)
