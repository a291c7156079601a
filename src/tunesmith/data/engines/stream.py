"""The data stage over a stream of batches: each step sees one batch at a time and keeps only its own state.

Steps that judge a row alone (scrub, lengths, ranges, regex, language) run on the batch as they are; the
dedup steps carry a compact index between batches (``dedup_index.py``); steps that need every row at once
(balance, sample, semantic_dedup) hold the rows that reach them and run when the input ends. What depends on
all rows is checked once the stream ends: a field a step or the recipe names is missing only if no row had it.
Set-aside rows are written in read order within each batch (and within what the held steps release), kept
examples to ``examples.jsonl`` as they come; the split is one byte per example, decided at the end.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from tunesmith.config import BalanceStep, ExactDedupStep, NearDedupStep, SampleStep, SemanticDedupStep, TokenLengthStep
from tunesmith.data.dedup.index import ExactIndex, NearIndex, exact_keys, near_keys, rows_of
from tunesmith.data.steps.curation import STEPS, StepContext, StepRow, apply_step, check_fields
from tunesmith.errors import DataError
from tunesmith.records import Example, Record, Rejected


@contextmanager
def stage_memory() -> Iterator[None]:
    """Arrow allocates from the C heap while the stage runs (its own pools keep what they free), so that
    :func:`release_freed` can hand freed batch memory back; the process's Arrow pool is restored afterwards,
    and no allocator setting outlives the stage."""
    import pyarrow as pa

    before = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(before)


def release_freed() -> None:
    """Give the pages of freed memory back to the system (glibc's ``malloc_trim``; no-op elsewhere). Called
    after each batch: glibc otherwise keeps them once its mmap threshold has risen, and the heap only grows
    (measured: +45 MB per 80k rows at 2,000-row batches)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@lru_cache(maxsize=1)
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        name = ctypes.util.find_library("c")
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


INDEXED = {ExactDedupStep: ExactIndex, NearDedupStep: NearIndex}
WHOLE = (BalanceStep, SampleStep, SemanticDedupStep)  # need every row that reaches them


@dataclass
class Curated:
    """One source curated: its examples (a range of the output's), rejects counted, per-step rows, rows read,
    the targets seen and the Ray nodes that worked on it (``data.engine: ray``)."""

    examples: range
    n_rejected: int
    rows: list
    n_read: int
    targets: set[str]
    nodes: set[str] = field(default_factory=set)


def step_fields(spec) -> list[str]:
    return list(getattr(spec, "fields", []) or [])


class StreamStep:
    """One curation step fed batch by batch; its summary row adds up over the batches, and the fields of every
    row that reached it are noted for :meth:`check`."""

    def __init__(self, i: int, spec, ctx: StepContext, workdir: Path):
        self.name, self.spec, self.ctx = f"{i + 1}:{spec.step}", spec, ctx
        indexed = INDEXED.get(type(spec))  # each its own folder: two dedup steps of a kind share no file
        self.fn = indexed(spec, workdir / self.name.replace(":", "-")) if indexed else STEPS[type(spec)]
        self.row = StepRow(self.name, 0, 0, 0, 0)
        self.held: list[Record] | None = [] if isinstance(spec, WHOLE) else None
        self.seen: set[str] = set()

    def push(self, records: list[Record]) -> tuple[list[Record], list[Rejected]]:
        if records and not set(step_fields(self.spec)) <= self.seen:
            self.seen.update(*(r.data for r in records))
        if self.held is not None:
            self.held += records
            return [], []
        return self._apply(records)

    def finish(self) -> tuple[list[Record], list[Rejected]]:
        if self.held is None:
            return [], []
        held, self.held = self.held, None
        return self._apply(held)

    def check(self) -> None:
        """A field no row that reached the step had is a recipe mistake (fail with the fields present)."""
        check_fields(self.seen, self.spec, self.name)

    def _apply(self, records: list[Record]) -> tuple[list[Record], list[Rejected]]:
        with unseen_named(step_fields(self.spec), self.seen):
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

    def push(self, records: list[Record], start: int = 0, keys: dict | None = None) -> tuple[list[Record], list[Rejected]]:
        """``records`` through the steps from ``start``; ``keys``: what the dedup steps compare, made elsewhere
        for these records (step index -> ``dedup_index.exact_keys`` / ``near_keys``)."""
        dropped: list[Rejected] = []
        at = {id(r): k for k, r in enumerate(records)} if keys else {}
        for i, step in enumerate(self.steps[start:], start):
            if keys and i in keys and records:
                step.fn.given = rows_of(keys[i], np.array([at[id(r)] for r in records], dtype=np.int64))
            records, out = step.push(records)
            dropped += out
        return records, dropped

    def dedup_after_head(self) -> list[tuple[int, object]]:
        """The dedup steps right after the leading row-wise steps (their keys can be made with those steps)."""
        out = []
        for i in range(self.head(), len(self.steps)):
            if not isinstance(self.steps[i].spec, tuple(INDEXED)):
                break
            out.append((i, self.steps[i].spec))
        return out

    def finish(self) -> Iterator[tuple[list[Record], list[Rejected], dict[str, int]]]:
        """What each held step releases, pushed through the steps after it, with the read order of its rows."""
        for i, step in enumerate(self.steps):
            held = list(step.held or [])
            kept, dropped = step.finish()
            if kept or dropped:
                more_kept, more_dropped = self.push(kept, i + 1)
                yield more_kept, dropped + more_dropped, {r.source: k for k, r in enumerate(held)}

    def check(self) -> None:
        for step in self.steps:
            step.check()

    @property
    def rows(self) -> list[StepRow]:
        return [s.row for s in self.steps]

    def head(self) -> int:
        """How many steps lead the chain that judge each row alone (before the first dedup or whole-data step)."""
        return next((i for i, s in enumerate(self.steps) if isinstance(s.spec, tuple(INDEXED) + WHOLE)),
                    len(self.steps))

    def close(self) -> None:
        for s in self.steps:
            s.close()


HELPER_BYTES = 32 << 20  # inputs from this size on have their leading row-wise steps run in a second process


class HeadSteps:
    """The chain's leading row-wise steps (scrub, lengths, ranges...) run in a second process a batch ahead of
    this one, which meanwhile dedups, maps and writes the batch before: both cores work. The process is a fresh
    interpreter (``python -c``, whatever this one's main module is); rows travel to it and back pickled through
    its standard input and output, and the per-step counts and fields come back at the end (:meth:`close`)."""

    def __init__(self, chain: StepChain, ctx: StepContext):
        import os
        import queue
        import subprocess
        import sys
        import threading

        self.chain, self.n = chain, chain.head()
        specs = [s.spec for s in chain.steps[: self.n]]
        needs = any(isinstance(spec, TokenLengthStep) for spec in specs)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen([sys.executable, "-c", "from tunesmith.data.engines.stream import serve_head; serve_head()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.outbox: queue.Queue = queue.Queue(maxsize=2)  # at most two batches ahead of the replies
        threading.Thread(target=self._send, daemon=True).start()  # writes while this thread reads: no deadlock
        self.outbox.put(("start", specs, ctx.portable(needs), chain.dedup_after_head()))

    def _send(self) -> None:
        while (message := self.outbox.get()) is not None:
            try:
                _write_frame(self.proc.stdin, message)
            except (BrokenPipeError, ValueError):
                return
        self.proc.stdin.close()

    def _reply(self):
        reply = _read_frame(self.proc.stdout)
        if reply is None:
            raise DataError(f"the data stage's second process ended (exit code {self.proc.wait()}); see its output above")
        kind, value = reply
        if kind == "error":
            raise value
        return value

    def run(self, batches) -> Iterator[tuple[object, list[Record], list[Rejected], dict]]:
        """``(batch, kept, dropped, keys)`` of each batch after the leading steps, in order, with what the dedup
        steps after them compare of the kept rows (made there too, so that both processes have work)."""
        pending = deque()
        for batch in batches:
            self.outbox.put(("push", batch.records))
            pending.append(batch)
            if len(pending) > 1:
                yield pending.popleft(), *self._reply()
        while pending:
            yield pending.popleft(), *self._reply()

    def close(self) -> None:
        """The leading steps' counts and fields into the chain; the process ends."""
        try:
            self.outbox.put(("state",))
            for step, (row, seen) in zip(self.chain.steps, self._reply(), strict=False):
                step.row, step.seen = row, seen
        finally:
            self.stop()

    def stop(self) -> None:
        self.outbox.put(None)
        try:
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001 - a process that does not end is ended
            self.proc.kill()


def _write_frame(fh, message) -> None:
    import pickle

    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    fh.write(len(body).to_bytes(8, "little"))
    fh.write(body)
    fh.flush()


def _read_frame(fh):
    import pickle

    head = fh.read(8)
    if len(head) < 8:
        return None
    return pickle.loads(fh.read(int.from_bytes(head, "little")))


def serve_head() -> None:
    """The second process: the leading steps over each batch it is sent (and the keys of the dedup steps after
    them), until its input ends."""
    import os
    import sys

    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to standard error, never into the replies
    with stage_memory():
        chain, dedup, failed = None, [], None
        while (message := _read_frame(sys.stdin.buffer)) is not None:
            release_freed()
            try:
                if failed is not None:
                    raise failed
                if message[0] == "start":
                    chain, dedup = StepChain(message[1], message[2], Path(".")), message[3]
                    continue
                _write_frame(out, ("ok", _head_reply(chain, dedup, message)))
            except Exception as exc:  # noqa: BLE001 - handed to the first process, which raises it
                if message[0] == "start":
                    failed = exc
                    continue
                _write_frame(out, ("error", exc))


def _head_reply(chain: StepChain, dedup: list, message: tuple):
    if message[0] != "push":
        return [(s.row, s.seen) for s in chain.steps]
    kept, dropped = chain.push(message[1])
    keys = {i: (exact_keys if isinstance(spec, ExactDedupStep) else near_keys)(kept, spec) for i, spec in dedup}
    return kept, dropped, keys if kept else {}


def in_read_order(rejected: list[Rejected], rank: dict[str, int]) -> list[Rejected]:
    """Set-aside rows in the order their rows were read (whatever step set them aside), so that every engine and
    batch size writes them alike."""
    end = len(rank)
    return sorted(rejected, key=lambda r: rank.get(r.source, end))


@contextmanager
def unseen_named(names: list[str], seen: set[str]) -> Iterator[None]:
    """A row's error (``on_error: fail``) says so when no row read so far had a field the recipe names: more
    likely a mistake in the recipe than in the row."""
    try:
        yield
    except DataError as exc:
        unseen = [n for n in names if n not in seen]
        if not unseen:
            raise
        raise DataError(f"{exc} No record read so far has the field(s) {unseen} named in the recipe; fields "
                        f"present: {sorted(seen)}.") from None


def mapped_fields(cfg) -> list[str]:
    """The fields mapping to examples reads of every row (``examples.to_examples`` fails a batch none of whose
    rows has one of them)."""
    order = cfg.order.by if cfg.order and cfg.order.by != "target" else None
    names = [*cfg.input_fields, cfg.target_field, cfg.split.stratify_field, cfg.split.group_field, order]
    return list(dict.fromkeys(n for n in names if n))


class ExampleMapper:
    """Rows to examples batch by batch (``examples.to_examples``), with the recipe's fields checked over the whole
    stream: a batch whose rows lack a field is mapped as if the field were empty in each (so each row is set
    aside for it, as with all rows at once), and :meth:`check` fails only if no row had the field."""

    def __init__(self, cfg):
        self.cfg, self.names, self.seen = cfg, mapped_fields(cfg), set()

    def __call__(self, records: list[Record]) -> tuple[list[Example], list[Rejected]]:
        from tunesmith.data.steps.examples import to_examples

        if not records:
            return [], []
        present = set().union(*(r.data for r in records))
        self.seen |= present
        absent = [n for n in self.names if n not in present]
        for rec in records:
            for name in absent:
                rec.data[name] = None
        try:
            with unseen_named(self.names, self.seen):
                return to_examples(records, self.cfg)
        finally:
            for rec in records:
                for name in absent:
                    rec.data.pop(name, None)

    def check(self, where: str) -> None:
        for name in self.names:
            if self.seen and name not in self.seen:
                raise DataError(f"{where}: no record has the field '{name}' named in the recipe; "
                                f"fields present: {sorted(self.seen)}")
