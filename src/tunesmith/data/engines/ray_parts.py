"""What the Ray engine's workers run (``ray_engine.py`` drives them): the recipe's steps over one part of the
input, the dedup shuffles' map and reduce sides, the steps that need every row, and the writing of the outputs.

A part (a reader batch) travels as one pickled ``Part`` per Arrow row, so rows keep their Python values and
``file:line`` exactly as the readers made them; every row carries its read position, which orders "first" and
"earlier" as in the local engine, and every set-aside row the position of its row, so that a part's rejects are
written in read order. Dedup decisions are made by the functions of the local engine (``minhash``,
``dedup.index.normalized_key``) on the rows each shuffle partition gathers: the driver sees none of them.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tunesmith.data.dedup.index import exact_keys, near_keys
from tunesmith.data.dedup.minhash import (
    MemorySets,
    Shingles,
    best_earlier,
    group_matches,
    keyed_rows,
    lsh_groups,
    near_reason,
)
from tunesmith.data.engines.outputs import example_lines, reject_lines
from tunesmith.data.engines.stream import ExampleMapper
from tunesmith.data.steps.curation import STEPS, StepContext, apply_step
from tunesmith.records import Record, Rejected


@dataclass
class Part:
    """One reader batch on its way through the steps: where it starts in read order (``phase`` counts the steps
    that needed every row before it), its rows and their read positions, what was set aside (with its row's
    position), per step its counts and the fields of the rows that reached it, and the Ray nodes it ran on."""

    start: int
    pos: list[int]
    records: list[Record]
    rejected: list[tuple[int, Rejected]] = field(default_factory=list)
    phase: int = 0
    n_read: int = 0
    counts: dict[int, list[int]] = field(default_factory=dict)  # step index -> [in, kept, dropped, changed]
    fields: dict[int, set[str]] = field(default_factory=dict)
    raw_fields: set[str] = field(default_factory=set)  # fields as read (before data.derive)
    nodes: set[str] = field(default_factory=set)

    def step(self, i: int, spec, ctx: StepContext, fn=None) -> None:
        """Run step ``i`` on the part's rows (``fn``: the step's function, or a decision made elsewhere)."""
        if self.records:
            self.fields.setdefault(i, set()).update(*(r.data for r in self.records))
        kept, dropped, row = apply_step(self.records, spec, ctx, f"{i + 1}:{spec.step}", fn or STEPS[type(spec)])
        self.set_aside(dropped)
        self.keep(kept)
        old = self.counts.get(i, [0, 0, 0, 0])
        self.counts[i] = [a + b for a, b in zip(old, (row.n_in, row.kept, row.dropped, row.changed), strict=True)]

    def set_aside(self, dropped: list[Rejected]) -> None:
        at = {r.source: p for r, p in zip(self.records, self.pos, strict=True)}
        self.rejected += [(at.get(r.source, self.start), r) for r in dropped]

    def keep(self, kept: list[Record]) -> None:
        at = {id(r): p for r, p in zip(self.records, self.pos, strict=True)}
        self.records, self.pos = kept, [at[id(r)] for r in kept]

    def span(self) -> tuple[int, int] | None:
        return (min(self.pos), max(self.pos)) if self.pos else None


def dump(parts: list[Part]):
    import pyarrow as pa

    return pa.table({"part": pa.array([pickle.dumps(p, protocol=pickle.HIGHEST_PROTOCOL) for p in parts],
                                      pa.large_binary())})


def load(table) -> list[Part]:
    return [pickle.loads(b) for b in table.column("part").to_pylist()]


def node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


# --- maps over parts (Ray Data map_batches, one part per call) ----------------------------------------------


def run_steps(table, steps: list, ctx: StepContext):
    """Row-wise steps ``[(index, spec), ...]`` in order over each part."""
    parts = load(table)
    for part in parts:
        part.nodes.add(node())
        for i, spec in steps:
            part.step(i, spec, ctx)
    return dump(parts)


def write_parts(table, cfg, seed: int, work: str, kind, split_cfg):
    """Each part's rows as examples, written by this worker beside the other parts' (examples, training lines,
    rejects in read order, split keys), and a small row about it for the driver. ``kind`` is the task kind's
    class, registered here as the entry points register it in the driver."""
    import pyarrow as pa

    from tunesmith.config.kinds import register
    from tunesmith.data.steps.split import example_keys

    register(kind)
    keys, metas = example_keys(split_cfg), []
    for part in load(table):
        part.nodes.add(node())
        mapper = ExampleMapper(cfg)
        examples, unmapped = mapper(part.records)
        part.set_aside(unmapped)
        rejected = [r for _, r in sorted(part.rejected, key=lambda x: x[0])]
        spool, train, hashes = example_lines(examples, cfg, seed)
        stem = Path(work) / f"{part.phase:03d}-{part.start:020d}"
        stem.with_suffix(".examples").write_bytes(b"".join(spool))
        stem.with_suffix(".train").write_bytes(b"".join(train))
        stem.with_suffix(".rejected").write_text(reject_lines(rejected), encoding="utf-8")
        labels = [keys.label(e) for e in examples] if split_cfg.stratify or split_cfg.stratify_field else None
        groups = [keys.group(e) for e in examples] if split_cfg.group_field else None
        sources = [e.meta.get("source", e.id) for e in examples]
        with open(stem.with_suffix(".keys"), "wb") as fh:
            pickle.dump((hashes, labels, groups, sources), fh, protocol=pickle.HIGHEST_PROTOCOL)
        metas.append({"stem": str(stem), "order": (part.phase, part.start), "examples": len(examples),
                      "rejected": len(rejected), "read": part.n_read, "counts": part.counts, "fields": part.fields,
                      "mapped": mapper.seen, "raw": part.raw_fields, "nodes": part.nodes,
                      "targets": {e.target for e in examples}})
    return pa.table({"meta": pa.array([pickle.dumps(m) for m in metas], pa.large_binary())})


# --- the steps that need every row: one task over all parts ------------------------------------------------


def whole_step(i: int, spec, ctx: StepContext, batch_rows: int, *tables):
    """Step ``i`` over every row that reaches it, in read order (the local engine holds them too): the parts
    keep what they had set aside; the rows go on as new parts of the next phase, cut every ``batch_rows`` rows,
    which also carry what this step set aside."""
    parts = sorted((p for t in tables for p in load(t)), key=lambda p: (p.phase, p.start))
    reached, pos = [r for p in parts for r in p.records], [q for p in parts for q in p.pos]
    whole = Part(pos[0] if pos else 0, pos, reached, phase=max((p.phase for p in parts), default=0) + 1)
    whole.nodes.add(node())
    whole.step(i, spec, ctx)
    for part in parts:
        part.records, part.pos = [], []
        yield dump([part])
    cut = sorted({p for p, _ in whole.rejected} | set(whole.pos))[::batch_rows] + [float("inf")]
    for k, (lo, hi) in enumerate(zip(cut[:-1], cut[1:], strict=False)):
        rows = [(r, p) for r, p in zip(whole.records, whole.pos, strict=True) if lo <= p < hi]
        chunk = Part(int(lo), [p for _, p in rows], [r for r, _ in rows], phase=whole.phase,
                     rejected=[(p, r) for p, r in whole.rejected if lo <= p < hi], nodes=set(whole.nodes))
        if k == 0:
            chunk.counts, chunk.fields = whole.counts, whole.fields
        yield dump([chunk])


# --- dedup shuffles: map side per block, reduce side per partition ---------------------------------------


def span_of(table) -> tuple[int, int] | None:
    """The read positions a block's rows span (its parts are consecutive in read order)."""
    spans = [s for p in load(table) if (s := p.span())]
    return (min(s[0] for s in spans), max(s[1] for s in spans)) if spans else None


def route(pos: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """The block each position belongs to, given the blocks' ``(lo, hi)`` spans sorted by ``lo``."""
    return np.searchsorted(spans[:, 0], pos, side="right") - 1


def _split(pos: np.ndarray, spans: np.ndarray, cols: dict) -> list[dict]:
    """``cols`` (arrays aligned with ``pos``) cut by the block of each position."""
    block = route(pos, spans)
    return [{k: v[block == b] for k, v in cols.items()} for b in range(len(spans))]


def _by_partition(key: np.ndarray, n: int, cols: dict) -> list[dict]:
    part = (key % np.uint64(n)).astype(np.int64) if key.dtype == np.uint64 else key % n
    return [{k: v[part == p] for k, v in cols.items()} for p in range(n)]


def _gather(chunks) -> dict:
    chunks = [c for c in chunks if c]
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} if chunks else {}


def exact_map(table, spec, n: int) -> list[dict]:
    """Per row the 64-bit hash of its normalised text (as the local index hashes it), its position and
    ``file:line``, cut into ``n`` hash partitions."""
    h, pos, src = [], [], []
    for part in load(table):
        h.append(exact_keys(part.records, spec))
        pos.append(np.asarray(part.pos, dtype=np.int64))
        src += [r.source for r in part.records]
    cols = {"hash": np.concatenate(h or [np.empty(0, np.uint64)]), "pos": np.concatenate(pos or [np.empty(0, np.int64)]),
            "source": np.asarray(src, dtype=object)}
    return _by_partition(cols["hash"], n, cols)


def exact_firsts(spans: np.ndarray, *chunks) -> list[dict]:
    """One hash partition: every row whose hash an earlier row has, with that hash's first row's ``file:line``,
    cut by the block it is in."""
    rows = _gather(chunks)
    if not rows:
        return [{} for _ in spans]
    order = np.lexsort((rows["pos"], rows["hash"]))
    h, pos = rows["hash"][order], rows["pos"][order]
    start = np.ones(len(h), dtype=bool)
    start[1:] = h[1:] != h[:-1]
    first = order[start][np.cumsum(start) - 1]
    later = ~start
    reasons = np.array([f"exact duplicate of {s}" for s in rows["source"][first[later]].tolist()], dtype=object)
    return _split(pos[later], spans, {"pos": pos[later], "reason": reasons})


def near_map(table, spec, n: int) -> list:
    """Per row with shingles its ``(band, key, position)`` rows, cut into ``n`` partitions by band key, and (first)
    the block's shingle sets and ``file:line``, which stay in the object store until the groups ask for them."""
    out_band, out_key, out_pos, pos_all, ids, offsets, src = [], [], [], [], [], [0], []
    for part in load(table):
        if not part.records:
            continue
        sh, keys = near_keys(part.records, spec)
        pos = np.asarray(part.pos, dtype=np.int64)
        nonempty = np.diff(sh.offsets) > 0
        b, k, p = keyed_rows(keys[nonempty], pos[nonempty])
        out_band.append(b)
        out_key.append(k)
        out_pos.append(p)
        pos_all.append(pos)
        ids.append(sh.ids)
        offsets += (sh.offsets[1:] + offsets[-1]).tolist()
        src += [r.source for r in part.records]
    sets = {"pos": np.concatenate(pos_all or [np.empty(0, np.int64)]), "offsets": np.asarray(offsets, np.int64),
            "ids": np.concatenate(ids or [np.empty(0, np.uint64)]), "source": np.asarray(src, dtype=object)}
    cols = {"band": np.concatenate(out_band or [np.empty(0, np.int64)]),
            "key": np.concatenate(out_key or [np.empty(0, np.int64)]),
            "pos": np.concatenate(out_pos or [np.empty(0, np.int64)])}
    return [sets, *_by_partition(cols["band"] * 7919 + cols["key"], n, cols)]


def near_groups(p: int, spans: np.ndarray, *chunks) -> list[dict]:
    """One partition of band keys: its groups (``minhash.lsh_groups``, any size) as ``(group, position)``
    memberships, the group numbered across partitions, cut by the block of the position."""
    rows = _gather(chunks)
    if not rows:
        return [{} for _ in spans]
    groups = lsh_groups(rows["band"], rows["key"], rows["pos"])
    gid = (np.int64(p) << np.int64(40)) + np.repeat(np.arange(len(groups), dtype=np.int64), groups.sizes)
    return _split(groups.members, spans, {"group": gid, "pos": groups.members})


def near_members(sets: dict, n: int, *chunks) -> list[dict]:
    """One block's memberships with the rows' shingle sets and ``file:line``, cut into ``n`` partitions by group."""
    rows = _gather(chunks)
    if not rows:
        return [{} for _ in range(n)]
    at = np.searchsorted(sets["pos"], rows["pos"])
    lo, hi = sets["offsets"][at], sets["offsets"][at + 1]
    cols = {"group": rows["group"], "pos": rows["pos"], "count": hi - lo, "source": sets["source"][at],
            "ids": np.array([sets["ids"][a:b] for a, b in zip(lo.tolist(), hi.tolist(), strict=True)] + [None],
                            dtype=object)[:-1]}
    return _by_partition(rows["group"], n, cols)


def near_best(spans: np.ndarray, threshold: float, *chunks) -> list[dict]:
    """One partition of groups: every row's best earlier match in them (``minhash.group_matches``), with the
    match's ``file:line``, cut by the block of the later row."""
    rows = _gather(chunks)
    if not rows:
        return [{} for _ in spans]
    groups = lsh_groups(np.zeros(len(rows["group"]), np.int64), rows["group"], rows["pos"])
    index, first = np.unique(rows["pos"], return_index=True)
    offsets = np.zeros(len(index) + 1, dtype=np.int64)
    np.cumsum(rows["count"][first], out=offsets[1:])
    ids = np.concatenate([rows["ids"][k] for k in first.tolist()] or [np.empty(0, np.uint64)])
    i, j, sim = group_matches(groups, index, MemorySets(Shingles(ids.astype(np.uint64), offsets)),
                              np.ones(len(index), bool), threshold)
    source = rows["source"][first][np.searchsorted(index, i)]
    return _split(j, spans, {"i": i, "j": j, "sim": sim, "source": source})


def near_reasons(*chunks) -> dict[int, str]:
    """A block's matches from every partition reduced to each row's best earlier match (``best_earlier``)."""
    rows = _gather(chunks)
    if not rows:
        return {}
    i, j, sim = best_earlier(rows["i"], rows["j"], rows["sim"])
    src = {int(a): s for a, s in zip(rows["i"].tolist(), rows["source"].tolist(), strict=True)}
    return {b: near_reason(src[a], s) for a, b, s in zip(i.tolist(), j.tolist(), sim.tolist(), strict=True)}


def drop_rows(table, i: int, spec, reasons: dict[int, str]):
    """A dedup step's decisions applied to a block: rows whose position has a reason are set aside with it."""
    def decided(records, _spec, _ctx):
        kept, dropped = [], []
        for rec, p in zip(records, at, strict=True):
            if p in reasons:
                dropped.append(Rejected(rec.source, "", reasons[p], rec.data))
            else:
                kept.append(rec)
        return kept, dropped

    parts = load(table)
    for part in parts:
        part.nodes.add(node())
        at = list(part.pos)
        part.step(i, spec, StepContext(), decided)
    return dump(parts)


def exact_reasons(*chunks) -> dict[int, str]:
    rows = _gather(chunks)
    return dict(zip(rows["pos"].tolist(), rows["reason"].tolist(), strict=True)) if rows else {}
