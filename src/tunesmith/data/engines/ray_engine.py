"""The data stage on a Ray cluster (``data.engine: ray``): the local engine's readers, steps, dedup decisions and
outputs, with every row handled on the workers and this process (the driver) only coordinating.

Workers read the input in shards (``ray_read.py``) and run the row-wise steps on each part as Ray Data
``map_batches``; ``exact_dedup`` is a group-by of the rows' text hashes and ``near_dedup`` a shuffle of LSH band
keys, then of the groups' rows with their shingle sets, with the Jaccard checks and the reasons made on the
workers (``ray_parts.py``); steps that need every row (``balance``, ``sample``, ``semantic_dedup``) run in one
worker task; workers write examples, training lines and rejects per part into the work folder, and one worker
task splits them and writes the output files. The driver holds object references, per part a few counts and the
sets of field names, never rows: its memory does not grow with the input. Every node needs tunesmith, the input
and the output folder at the same paths (a shared file system); the tokenizer travels with the steps.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from rich.console import Console

from tunesmith.config import ExactDedupStep, NearDedupStep
from tunesmith.config.kinds import kind_class
from tunesmith.data.engines import ray_parts, ray_read
from tunesmith.data.engines.outputs import SpooledSplits
from tunesmith.data.engines.stream import WHOLE, Curated, ExampleMapper
from tunesmith.data.read.sources import check_derive
from tunesmith.data.steps.curation import StepContext, StepRow, check_fields, token_limits
from tunesmith.data.steps.split import SplitKeys
from tunesmith.errors import ConfigError, DataError, TunesmithError

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


def curate_on_ray(cfg, ctx: StepContext, console: Console, profile_dir: Path | None, out: RayOutput,
                  name: str = "all") -> Curated:
    """``prepare.curate``'s work on the cluster: read, curate and write on the workers (the profile too, into
    ``profile_dir``); this process gathers counts and checks the recipe's fields over every part."""
    ray = ray_module()
    ctx = _shipped(ctx, cfg, profile_dir)
    work = out.work / name
    (work / "parts").mkdir(parents=True, exist_ok=True)
    (work / "sketches").mkdir(exist_ok=True)
    try:
        stages = _stages(cfg.steps)
        first = stages.pop(0) if stages and not _is_barrier(stages[0]) else []
        blocks, shards = _read(ray, cfg, ctx, first, str(work / "sketches") if profile_dir else None)
        console.print(f"Ray: {shards} shard(s) read on the workers")
        for stage in stages:
            blocks = _run_stage(ray, blocks, stage, ctx, cfg.batch_rows)
        metas = _write(ray, blocks, cfg, out, work / "parts")
        if profile_dir is not None:
            ray.get(_remote(ray, ray_read.merge_sketches).remote(cfg, ctx, str(work / "sketches"), str(profile_dir),
                                                                 token_limits(cfg.steps)))
    except TunesmithError:
        raise
    except Exception as exc:  # a step's own error comes back wrapped by Ray
        raise _own_error(exc) or exc from None
    return _curated(cfg, metas, out)


def _shipped(ctx: StepContext, cfg, profile_dir) -> StepContext:
    """The steps' context for the workers, with the tokenizer where a step, the profile or the reader needs it."""
    needs = profile_dir is not None or cfg.format == "documents" or any(s.step == "token_length" for s in cfg.steps)
    return ctx.portable(needs)


def _own_error(exc: BaseException) -> TunesmithError | None:
    """The ``TunesmithError`` a worker raised, from the chain of exceptions Ray wraps it in."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TunesmithError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


def _remote(ray, fn, num_returns: int = 1):
    return ray.remote(fn).options(num_returns=num_returns)


def _fanout(fn, n: int, *args):
    """``fn(*args)`` (a list of ``n`` outputs) as ``n`` task returns."""
    out = fn(*args)
    return out[0] if n == 1 else tuple(out)


def _task(ray, fn, n: int, *args) -> list:
    """A task of ``fn`` whose ``n`` outputs come back as ``n`` object references."""
    refs = ray.remote(_fanout).options(num_returns=n).remote(fn, n, *args)
    return [refs] if n == 1 else list(refs)


def _read(ray, cfg, ctx: StepContext, steps: list, sketches: str | None):
    """The shards read (and the first row-wise steps run) as Ray Data ``map_batches``: one block per part."""
    shards = ray_read.plan(cfg)
    if shards[0].end is not None:
        count = _remote(ray, ray_read.count_newlines)
        shards = ray_read.numbered(shards, ray.get([count.remote(str(cfg.path), s.start, s.end) for s in shards]))
    ds = ray.data.from_arrow([ray_read.shard_table([s]) for s in shards])
    ds = ds.map_batches(ray_read.read_parts, batch_size=1, batch_format="pyarrow", fn_args=(cfg, ctx, sketches))
    if steps:
        ds = ds.map_batches(ray_parts.run_steps, batch_size=1, batch_format="pyarrow", fn_args=(steps, ctx))
    return ds.to_arrow_refs(), len(shards)


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


def _run_stage(ray, blocks: list, stage: list, ctx: StepContext, batch_rows: int) -> list:
    if not _is_barrier(stage):
        ds = ray.data.from_arrow_refs(blocks)
        return ds.map_batches(ray_parts.run_steps, batch_size=1, batch_format="pyarrow",
                              fn_args=(stage, ctx)).to_arrow_refs()
    i, spec = stage[0]
    if isinstance(spec, WHOLE):
        whole = ray.remote(ray_parts.whole_step).options(num_returns="streaming")
        return list(whole.remote(i, spec, ctx, batch_rows, *blocks))
    spans = ray.get([_remote(ray, ray_parts.span_of).remote(b) for b in blocks])
    live = [k for k, s in enumerate(spans) if s is not None]
    if not live:
        return blocks
    at = np.array([spans[k] for k in live], dtype=np.int64)
    dedup = _exact if isinstance(spec, ExactDedupStep) else _near
    reasons = dedup(ray, [blocks[k] for k in live], at, spec, _partitions(ray, len(live)))
    drop = _remote(ray, ray_parts.drop_rows)
    out = list(blocks)
    for k, why in zip(live, reasons, strict=True):
        out[k] = drop.remote(blocks[k], i, spec, why)
    return out


def _partitions(ray, blocks: int) -> int:
    return max(1, min(2 * int(ray.cluster_resources().get("CPU", 1)), 32, blocks))


def _exact(ray, blocks: list, spans: np.ndarray, spec, n: int) -> list:
    """Group-by of text hashes: map each block's rows to ``n`` hash partitions, find each hash's first row in
    each partition, route the duplicates' reasons back to their blocks."""
    keys = [_task(ray, ray_parts.exact_map, n, b, spec, n) for b in blocks]
    firsts = [_task(ray, ray_parts.exact_firsts, len(blocks), spans, *[k[p] for k in keys]) for p in range(n)]
    reasons = _remote(ray, ray_parts.exact_reasons)
    return [reasons.remote(*[f[b] for f in firsts]) for b in range(len(blocks))]


def _near(ray, blocks: list, spans: np.ndarray, spec, n: int) -> list:
    """Band shuffles: LSH band keys to ``n`` partitions, where the groups are found; each group's rows back with
    their shingle sets to the partition of the group, where every row's best earlier match is found; the
    matches back to the blocks, reduced there to one reason per row."""
    keys = [_task(ray, ray_parts.near_map, 1 + n, b, spec, n) for b in blocks]
    groups = [_task(ray, ray_parts.near_groups, len(blocks), p, spans, *[k[1 + p] for k in keys]) for p in range(n)]
    members = [_task(ray, ray_parts.near_members, n, keys[b][0], n, *[g[b] for g in groups])
               for b in range(len(blocks))]
    best = [_task(ray, ray_parts.near_best, len(blocks), spans, spec.threshold, *[m[p] for m in members])
            for p in range(n)]
    reasons = _remote(ray, ray_parts.near_reasons)
    return [reasons.remote(*[x[b] for x in best]) for b in range(len(blocks))]


def _write(ray, blocks: list, cfg, out: RayOutput, folder: Path) -> list[dict]:
    """Examples and rejects written by the workers, part by part; a small row about each part comes back."""
    import pickle

    ds = ray.data.from_arrow_refs(blocks).map_batches(
        ray_parts.write_parts, batch_size=1, batch_format="pyarrow",
        fn_args=(cfg, out.seed, str(folder), kind_class(cfg.task), out.split_cfg))
    metas = [pickle.loads(m) for t in ds.iter_batches(batch_size=None, batch_format="pyarrow")
             for m in t.column("meta").to_pylist()]
    return sorted(metas, key=lambda m: m["order"])


def _curated(cfg, metas: list[dict], out: RayOutput) -> Curated:
    """The parts' counts added up and the recipe's fields checked over all of them, as the local engine does once
    its stream has ended."""
    n_read = sum(m["read"] for m in metas)
    if n_read == 0 and ray_read.plan(cfg)[0].end is not None:
        raise DataError(f"{cfg.path}: the file is empty")
    for i, spec in enumerate(cfg.steps):
        check_fields(set().union(*(m["fields"].get(i, set()) for m in metas)), spec, f"{i + 1}:{spec.step}")
    mapper = ExampleMapper(cfg)
    mapper.seen = set().union(*(m["mapped"] for m in metas))
    mapper.check(str(cfg.path or cfg.hub.name))
    if cfg.derive:
        check_derive(set().union(*(m["raw"] for m in metas)), cfg.derive)
    counts: dict[int, list[int]] = {}
    for m in metas:
        for i, c in m["counts"].items():
            counts[i] = [a + b for a, b in zip(counts.get(i, [0, 0, 0, 0]), c, strict=True)]
    rows = [StepRow(f"{i + 1}:{spec.step}", *counts.get(i, [0, 0, 0, 0])) for i, spec in enumerate(cfg.steps)]
    start = len(out)
    out.add(metas)
    uses_labels = kind_class(cfg.task).uses_labels
    targets = set().union(*(m["targets"] for m in metas)) if uses_labels else set()
    return Curated(range(start, len(out)), sum(m["rejected"] for m in metas), rows, n_read, targets,
                   set().union(*(m["nodes"] for m in metas)))



class RayOutput:
    """Where the Ray engine's parts were written (by the workers, in the work folder): the driver keeps a row per
    part; :meth:`split` has one worker split the examples and write the output files in read order."""

    def __init__(self, data_dir: Path, work: Path, cfg, seed: int, split_cfg):
        self.data_dir, self.work, self.cfg, self.seed, self.split_cfg = data_dir, work, cfg, seed, split_cfg
        self.stems: list[str] = []
        self.n = 0

    def add(self, metas: list[dict]) -> None:
        self.stems += [m["stem"] for m in metas]
        self.n += sum(m["examples"] for m in metas)

    def __len__(self) -> int:
        return self.n

    def split(self, parts: dict[str, range], assign) -> tuple[SpooledSplits, dict]:
        ray = ray_module()
        counts, notes = ray.get(_remote(ray, assemble).remote(self.stems, str(self.data_dir), parts, assign))
        return SpooledSplits(self.data_dir / "examples.jsonl", counts), notes

    def close(self) -> None:
        pass


def assemble(stems: list[str], data_dir: str, parts: dict[str, range], assign) -> tuple[dict, dict]:
    """One worker: the parts' split keys read in order, each example's split decided (``assign``, as locally),
    and examples.jsonl, rejected.jsonl, examples.split and the split files written from the parts' files."""
    import pickle

    from tunesmith.data.engines.outputs import write_splits
    from tunesmith.data.steps.split import _codes

    hashes, labels, groups, sources = [], [], [], []
    for stem in stems:
        with open(Path(stem).with_suffix(".keys"), "rb") as fh:
            h, lab, grp, src = pickle.load(fh)
        hashes.append(h)
        labels += lab or []
        groups += grp or []
        sources += src
    hashes = np.concatenate(hashes or [np.empty(0, np.uint64)])

    def read_keys(part: range) -> SplitKeys:
        lo, hi = part.start, part.stop
        lab = _codes(labels[lo:hi]) if labels else (None, None)
        grp = _codes(groups[lo:hi]) if groups else (None, None)
        return SplitKeys(hashes[lo:hi], *lab, *grp, where=lambda i: sources[lo + i])

    codes, notes = assign(parts, read_keys)
    out = Path(data_dir)
    for suffix, name in ((".examples", "examples.jsonl"), (".rejected", "rejected.jsonl")):
        with open(out / name, "wb") as fh:
            for stem in stems:
                fh.write(Path(stem).with_suffix(suffix).read_bytes())
    splits = write_splits(codes, _lines(stems, ".train"), out)
    return splits.counts, notes


def _lines(stems: list[str], suffix: str):
    for stem in stems:
        with open(Path(stem).with_suffix(suffix), "rb") as fh:
            yield from fh
