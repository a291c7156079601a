"""The data stage over a stream of batches: each step sees one batch at a time and keeps only its own state.

Steps that judge a row alone (scrub, lengths, ranges, regex, language) run on the batch as they are; the
dedup steps carry a compact index between batches (``dedup_index.py``); steps that need every row at once
(balance, sample, semantic_dedup) hold the rows that reach them and run when the input ends. Kept examples
go to ``examples.jsonl`` as they come; the splits are lists of positions into it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tunesmith.config import BalanceStep, ExactDedupStep, NearDedupStep, SampleStep, SemanticDedupStep
from tunesmith.data.dedup_index import ExactIndex, NearIndex, SpillLog
from tunesmith.data.split import ItemKeys
from tunesmith.data.steps import STEPS, StepContext, StepRow, apply_step, check_fields
from tunesmith.records import Example, Record, Rejected


def return_freed_arrays() -> None:
    """Have freed batch memory go back to the system at once: Arrow allocates from the C heap (its own pool
    keeps what it freed), and glibc keeps a fixed mmap threshold. By default glibc raises the threshold after
    the first large free, so every batch's arrays then come from the heap, which fragments and only grows
    (measured: +45 MB per 80k rows at 2,000-row batches, none with a fixed threshold). No-op off glibc."""
    import ctypes
    import ctypes.util

    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return
    if mallopt is not None:
        mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD


INDEXED = {ExactDedupStep: ExactIndex, NearDedupStep: NearIndex}
WHOLE = (BalanceStep, SampleStep, SemanticDedupStep)  # need every row that reaches them


@dataclass
class Curated:
    """One source curated: kept rows' positions in the spool, rejects counted, per-step rows, rows read, the
    targets seen and the Ray nodes that worked on it (``data.engine: ray``)."""

    positions: list[int]
    n_rejected: int
    rows: list
    n_read: int
    targets: set[str]
    nodes: set[str] = field(default_factory=set)


class StreamStep:
    """One curation step fed batch by batch; its summary row adds up over the batches."""

    def __init__(self, i: int, spec, ctx: StepContext, workdir: Path):
        self.name, self.spec, self.ctx = f"{i + 1}:{spec.step}", spec, ctx
        self.fn = INDEXED[type(spec)](spec, workdir) if type(spec) in INDEXED else STEPS[type(spec)]
        self.row = StepRow(self.name, 0, 0, 0, 0)
        self.held: list[Record] | None = [] if isinstance(spec, WHOLE) else None
        self.checked = False

    def push(self, records: list[Record]) -> tuple[list[Record], list[Rejected]]:
        if not self.checked and records:  # a field no row of the first batch has is a recipe mistake
            check_fields(set().union(*(r.data for r in records)), self.spec, self.name)
            self.checked = True
        if self.held is not None:
            self.held += records
            return [], []
        return self._apply(records)

    def finish(self) -> tuple[list[Record], list[Rejected]]:
        if self.held is None:
            return [], []
        held, self.held = self.held, None
        return self._apply(held)

    def _apply(self, records: list[Record]) -> tuple[list[Record], list[Rejected]]:
        kept, dropped, row = apply_step(records, self.spec, self.ctx, self.name, self.fn)
        for k in ("n_in", "kept", "dropped", "changed"):
            setattr(self.row, k, getattr(self.row, k) + getattr(row, k))
        return kept, dropped

    def close(self) -> None:
        if hasattr(self.fn, "close"):
            self.fn.close()


class StepChain:
    """The recipe's steps in order over batches; ``finish`` runs the held steps and flushes what follows."""

    def __init__(self, specs: list, ctx: StepContext, workdir: Path):
        self.steps = [StreamStep(i, spec, ctx, workdir) for i, spec in enumerate(specs)]

    def push(self, records: list[Record], start: int = 0) -> tuple[list[Record], list[Rejected]]:
        dropped: list[Rejected] = []
        for step in self.steps[start:]:
            records, out = step.push(records)
            dropped += out
        return records, dropped

    def finish(self) -> Iterator[tuple[list[Record], list[Rejected]]]:
        for i, step in enumerate(self.steps):
            kept, dropped = step.finish()
            if kept or dropped:
                more_kept, more_dropped = self.push(kept, i + 1)
                yield more_kept, dropped + more_dropped

    @property
    def rows(self) -> list[StepRow]:
        return [s.row for s in self.steps]

    def close(self) -> None:
        for s in self.steps:
            s.close()


class ExampleSpool:
    """Kept examples in read order, one JSON line each, with their split keys (for stratified or grouped
    splits) as small codes in memory."""

    def __init__(self, path: Path, label_of=None, group_of=None):
        path.unlink(missing_ok=True)
        self.path, self.log = path, SpillLog(path)
        self.label_of, self.group_of = label_of, group_of
        self.codes = Codes() if label_of else None
        self.groups = Codes() if group_of else None

    def add(self, examples: list[Example]) -> range:
        start = len(self.log)
        self.log.extend([(json.dumps([e.id, e.inputs, e.target, e.meta], ensure_ascii=False, default=str)
                          + "\n").encode("utf-8", "surrogatepass") for e in examples])
        if self.codes is not None:
            self.codes.extend(self.label_of(e) for e in examples)
        if self.groups is not None:
            self.groups.extend(self.group_of(e) for e in examples)
        return range(start, len(self.log))

    def keys(self) -> ItemKeys:
        """How the split reads a position: its label and group codes; its source from the file (errors only)."""
        return ItemKeys(
            lambda i: self.codes.value(i) if self.codes else None,
            lambda i: self.groups.value(i) if self.groups else None,
            lambda i: self.read(i).meta.get("source", i),
        )

    def read(self, i: int) -> Example:
        return _example(self.log.get(i))

    def splits(self, positions: dict[str, list[int]]) -> SpooledSplits:
        self.log.fh.flush()
        return SpooledSplits(self.path, np.frombuffer(self.log.offsets, dtype=np.int64).copy(),
                             {k: np.asarray(v, dtype=np.int64) for k, v in positions.items()})

    def close(self) -> None:
        self.log.close()


class Codes:
    """A value per position stored as a small integer code (labels, groups: few distinct values)."""

    def __init__(self):
        from array import array

        self.of: dict = {}
        self.values: list = []
        self.codes = array("i")

    def extend(self, values) -> None:
        for v in values:
            code = self.of.get(v)
            if code is None:
                code = self.of[v] = len(self.values)
                self.values.append(v)
            self.codes.append(code)

    def value(self, i: int):
        return self.values[self.codes[i]]


def _example(line: bytes) -> Example:
    ex_id, inputs, target, meta = json.loads(line)
    return Example(ex_id, inputs, target, meta)


@dataclass
class SpooledSplits(Mapping):
    """train/val/test/unused as positions into ``examples.jsonl``: a split's ``Example`` list is read from the
    file the first time it is asked for, so the data stage itself never holds the examples."""

    path: Path
    offsets: np.ndarray
    positions: dict[str, np.ndarray]
    _lists: dict[str, list[Example]] = field(default_factory=dict, repr=False)

    def __getitem__(self, name: str) -> list[Example]:
        if name not in self._lists:
            self._lists[name] = list(self.iter(name)) if name in self.positions else self._missing(name)
        return self._lists[name]

    def _missing(self, name: str):
        raise KeyError(name)

    def __iter__(self):
        return iter(self.positions)

    def __len__(self) -> int:
        return len(self.positions)

    def count(self, name: str) -> int:
        return len(self.positions[name])

    def iter(self, name: str) -> Iterator[Example]:
        """The split's examples in split order, one read at a time."""
        with open(self.path, "rb") as fh:
            for i in self.positions[name].tolist():
                fh.seek(int(self.offsets[i]))
                yield _example(fh.read(int(self.offsets[i + 1] - self.offsets[i])))

    def __getstate__(self):  # the cache pickles positions, never the loaded lists
        return {"path": self.path, "offsets": self.offsets, "positions": self.positions}

    def __setstate__(self, state):
        self.__init__(**state)

    def moved(self, path: Path) -> SpooledSplits:
        return SpooledSplits(path, self.offsets, self.positions)
