"""The data stage on a Ray cluster (``data.engine: ray``): the local engine's readers, steps and outputs, with
the per-row work in Ray Data ``map_batches`` and the dedup decisions made by distributed group-bys.

This process reads the input with the batched readers (every row keeps ``file:line``; the profile is made as
it reads) into Ray's object store, one block per reader batch. Row-wise steps and the mapping to examples run
on the workers, a batch per call. A dedup step is a barrier: ``exact_dedup`` groups the rows' text hashes and
keeps each hash's first row; ``near_dedup`` emits ``(band, key, position)`` per LSH band and groups by band,
which pairs each row with the earlier rows of its buckets; the candidate pairs are verified here by exact
Jaccard on the shingle sets of the rows in them, and a row is dropped as a near duplicate of any earlier row,
named by the first row of its chain, as the local engine decides. ``balance``, ``sample`` and
``semantic_dedup`` need every row at once and run in this process, as they hold every row locally too.
Kept examples and rejects are written in read order, so the files equal the local engine's.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from rich.console import Console

from tunesmith.config import ExactDedupStep, NearDedupStep
from tunesmith.config.kinds import kind_class
from tunesmith.data import ray_parts
from tunesmith.data.batches import stream_source
from tunesmith.data.dedup_index import NearIndex, pair_jaccard
from tunesmith.data.minhash import earlier_roots, lsh_params
from tunesmith.data.ray_parts import Part
from tunesmith.data.steps import STEPS, StepContext, StepRow, apply_step, check_fields, plain_backend
from tunesmith.data.stream import WHOLE, Curated
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.progress import rate_bar

DEDUP = (ExactDedupStep, NearDedupStep)
_HOST_PORT = re.compile(r"^\[?[\w.:-]+?\]?:(\d+)$")


def ray_module():
    try:
        import ray
        import ray.data  # noqa: F401 - the engine's datasets
    except ImportError:
        raise ConfigError("data.engine: ray needs Ray Data: pip install 'tunesmith[ray]'") from None
    return ray


@contextmanager
def ray_session(address: str | None) -> Iterator[object]:
    """Ray for one data stage: the one this process already runs, else the cluster at ``address`` (or
    RAY_ADDRESS), else a local Ray started here and stopped afterwards."""
    ray = ray_module()
    started = not ray.is_initialized()
    if started:
        _connect(ray, address)
    try:
        with _data_settings(ray):
            yield ray
    finally:
        if started:
            ray.shutdown()


def _connect(ray, address: str | None) -> None:
    """``ray.init``, failing at once with a ``ConfigError`` when ``HOST:PORT`` does not answer (Ray itself
    retries for minutes)."""
    m = _HOST_PORT.match(address or "")
    if m:
        host = address[: -len(m.group(1)) - 1].strip("[]")
        try:
            socket.create_connection((host, int(m.group(1))), timeout=5).close()
        except OSError as exc:
            raise ConfigError(f"data.ray_address: no Ray cluster answers at {address} ({exc})") from None
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"at {address}" if address else "(local)"
        raise ConfigError(f"data.engine ray: could not start or reach Ray {where}: {exc}") from None


@contextmanager
def _data_settings(ray):
    """Ray Data quiet, in order and raising the steps' own errors while the stage runs; restored after."""
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.raise_original_map_exception,
             ctx.execution_options.preserve_order)
    ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.raise_original_map_exception = False, False, True
    ctx.execution_options.preserve_order = True
    level = logging.getLogger("ray.data").level
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        yield
    finally:
        (ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.raise_original_map_exception,
         ctx.execution_options.preserve_order) = saved
        logging.getLogger("ray.data").setLevel(level)


def curate_on_ray(cfg, ctx: StepContext, console: Console, sketch, out, name: str = "all") -> Curated:
    """``prepare.curate``'s work on Ray: read here (the profile ``sketch`` sees every batch as read), curate
    on the cluster, write ``out`` in read order."""
    ray = ray_module()
    if any(spec.step == "token_length" for spec in cfg.steps):
        ctx = _shipped_tokenizer(ctx)
    try:
        ds, n_read = _read(ray, cfg, ctx, console, sketch, name)
        for stage in _stages(cfg.steps):
            ds = _run_stage(ray, ds, stage, ctx)
        ds = ds.map_batches(ray_parts.map_examples, batch_size=1, batch_format="pyarrow", fn_args=(cfg, kind_class(cfg.task)))
        kept_at, n_rejected, targets, counts, nodes = _write(ds, cfg, out)
    except TunesmithError:
        raise
    except Exception as exc:  # a step's own error comes back wrapped by Ray
        raise _own_error(exc) or exc from None
    rows = [StepRow(f"{i + 1}:{spec.step}", *counts.get(i, [0, 0, 0, 0])) for i, spec in enumerate(cfg.steps)]
    return Curated(kept_at, n_rejected, rows, n_read, targets, nodes)


def _shipped_tokenizer(ctx: StepContext) -> StepContext:
    """The steps' context with the tokenizer loaded here, as its plain Rust backend where it has one (the same
    counts and cuts, and a worker unpickles it without importing transformers): workers need no model files."""
    tok = ctx.tok()
    return StepContext(on_error=ctx.on_error, _tok=plain_backend(tok) or tok)


def _own_error(exc: BaseException) -> TunesmithError | None:
    """The ``TunesmithError`` a worker raised, from the chain of exceptions Ray wraps it in."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TunesmithError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


def _read(ray, cfg, ctx: StepContext, console: Console, sketch, name: str):
    """The input through the batched readers into the object store, one ``Part`` (a block) per batch."""
    refs, n_read, first = [], 0, 0
    with rate_bar(console, "read" if name == "all" else f"read {name}") as update:
        for b, batch in enumerate(stream_source(cfg, ctx.tok)):
            if sketch is not None:
                sketch.add(batch.records)
            pos = list(range(first, first + len(batch.records)))
            first += len(batch.records)
            n_read += len(batch.records) + len(batch.rejected)
            refs.append(ray.put(ray_parts.dump([Part(b, pos, batch.records, list(batch.rejected))])))
            update(n_read, batch.fraction, "rows into Ray")
    return ray.data.from_arrow_refs(refs), n_read


def _stages(specs: list) -> list[list[tuple[int, object]]]:
    """The steps cut into runs of row-wise steps and single barrier steps (dedup, whole-data steps)."""
    stages: list[list] = []
    for i, spec in enumerate(specs):
        barrier = isinstance(spec, DEDUP + WHOLE)
        if barrier or not stages or _is_barrier(stages[-1]):
            stages.append([(i, spec)])
        else:
            stages[-1].append((i, spec))
    return stages


def _is_barrier(stage: list) -> bool:
    return len(stage) == 1 and isinstance(stage[0][1], DEDUP + WHOLE)


def _run_stage(ray, ds, stage: list, ctx: StepContext):
    if not _is_barrier(stage):
        return ds.map_batches(ray_parts.run_steps, batch_size=1, batch_format="pyarrow", fn_args=(stage, ctx))
    i, spec = stage[0]
    ds = ds.materialize()  # read twice: for the keys, then to drop the duplicates
    if isinstance(spec, ExactDedupStep):
        reasons = _exact_reasons(ray, ds, spec)
    elif isinstance(spec, NearDedupStep):
        reasons = _near_reasons(ray, ds, spec)
    else:
        return _whole_step(ray, ds, i, spec, ctx)
    return ds.map_batches(ray_parts.drop_rows, batch_size=1, batch_format="pyarrow", fn_args=(i, spec, reasons))


def _partitions(ray) -> int:
    return max(1, min(16, int(ray.cluster_resources().get("CPU", 1))))


def _collect(ds) -> dict[str, np.ndarray]:
    """A small dataset's columns in this process."""
    cols: dict[str, list] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in batch.items():
            cols.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in cols.items()}


def _exact_reasons(ray, ds, spec) -> dict[int, str]:
    """Group by text hash (hash buckets spread over the cluster): every row after a hash's first is dropped."""
    n = _partitions(ray)
    keys = ds.map_batches(ray_parts.exact_keys, batch_size=1, batch_format="pyarrow", fn_args=(spec, n))
    dup = _collect(keys.groupby("bucket", num_partitions=n).map_groups(ray_parts.exact_firsts, batch_format="numpy"))
    if not dup:
        return {}
    return {p: f"exact duplicate of {f}" for p, f in zip(dup["pos"].tolist(), dup["first"].tolist(), strict=True)}


def _near_reasons(ray, ds, spec) -> dict[int, str]:
    """Group LSH band keys by band across the cluster for candidate pairs, verify them here by exact Jaccard
    and decide in read order: a row with a near duplicate before it is dropped, named by its chain's first row."""
    bands, rows = lsh_params(spec.threshold, spec.num_perm)
    keys = ds.map_batches(ray_parts.near_keys, batch_size=1, batch_format="pyarrow", fn_args=(spec, bands, rows))
    grouped = keys.groupby("band", num_partitions=min(bands, _partitions(ray)))
    found = _collect(grouped.map_groups(ray_parts.band_candidates, batch_format="numpy",
                                        fn_args=(NearIndex.max_bucket,)))
    if not found or not len(found["a"]):
        return {}
    pairs = np.unique(np.stack([found["a"], found["b"]], axis=1), axis=0)
    involved = np.unique(pairs)
    got = _collect(ds.map_batches(ray_parts.rows_at, batch_size=1, batch_format="pyarrow",
                                  fn_args=(involved, spec)))
    order = np.argsort(got["pos"])
    sets = [np.frombuffer(got["shingles"][k], dtype=np.uint64) for k in order]
    sources = got["source"][order].tolist()
    local = np.searchsorted(got["pos"][order], pairs)
    sim = pair_jaccard(sets, local)
    good = sim >= spec.threshold
    local, sim = local[good], sim[good]
    score: dict[int, float] = {}
    for j, s in zip(local[:, 1].tolist(), sim.tolist(), strict=True):
        score[j] = max(score.get(j, 0.0), s)
    root = earlier_roots(len(involved), local)
    return {int(involved[j]): f"near duplicate of {sources[root[j]]} (similarity {s:.2f})" for j, s in score.items()}


def _whole_step(ray, ds, i: int, spec, ctx: StepContext):
    """A step that needs every row at once, here (the local engine holds them too): its kept rows become one
    more part after the others, as the local engine writes them when the input ends."""
    parts = [p for table in ds.iter_batches(batch_size=1, batch_format="pyarrow") for p in ray_parts.load(table)]
    records, pos = [], []
    for part in parts:
        part.reach(i)
        records += part.records
        pos += part.pos
        part.records, part.pos = [], []
    held = Part(len(parts) and max(p.batch for p in parts) + 1, pos, records)
    kept, dropped, row = apply_step(records, spec, ctx, f"{i + 1}:{spec.step}", STEPS[type(spec)])
    held.keep(kept)
    held.rejected += dropped
    held.count(i, row.n_in, row.kept, row.dropped, row.changed)
    return ray.data.from_arrow_refs([ray.put(ray_parts.dump([p])) for p in [*parts, held]])


def _write(ds, cfg, out):
    """Parts in read order into the spool and rejected.jsonl; each step's fields are checked on the first part
    whose rows reached it, as the local engine checks its first batch."""
    from tunesmith.data.examples import labels_of

    uses_labels = bool(labels_of({"x"}, cfg))
    kept_at: list[int] = []
    n_rejected, targets, counts, nodes, checked = 0, set(), {}, set(), set()
    for table in ds.iter_batches(batch_size=1, batch_format="pyarrow"):
        for part in ray_parts.load(table):
            for i, seen in sorted(part.fields.items()):
                if i not in checked and seen:
                    check_fields(seen, cfg.steps[i], f"{i + 1}:{cfg.steps[i].step}")
                    checked.add(i)
            kept_at.extend(out.write(part.examples, part.rejected))
            n_rejected += len(part.rejected)
            if uses_labels:
                targets.update(e.target for e in part.examples)
            for i, c in part.counts.items():
                counts[i] = [a + b for a, b in zip(counts.get(i, [0, 0, 0, 0]), c, strict=True)]
            nodes |= part.nodes
    return kept_at, n_rejected, targets, counts, nodes
