"""What the Ray engine's workers run (``ray_engine.py`` drives them): the recipe's steps over one reader batch,
the dedup keys each row brings, the group-by functions that find duplicates, and the mapping to examples.

A reader batch travels as one ``Part`` pickled into one Arrow row, so rows keep their Python values and
``file:line`` exactly as the readers made them; each row carries its read position, which orders "first"
and "earlier" as in the local engine.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import numpy as np

from tunesmith.data.dedup_index import band_keys, field_text, normalized_keys, text_hash
from tunesmith.data.examples import to_examples
from tunesmith.data.minhash import shingle, signatures
from tunesmith.data.steps import STEPS, StepContext, apply_step
from tunesmith.records import Example, Record, Rejected


@dataclass
class Part:
    """One reader batch on its way through the steps: the rows left, their read positions, what was set aside
    (in the order the local engine writes it), per step its counts and the fields of the rows that reached it,
    and the Ray nodes that worked on it."""

    batch: int
    pos: list[int]
    records: list[Record]
    rejected: list[Rejected] = field(default_factory=list)
    counts: dict[int, list[int]] = field(default_factory=dict)  # step index -> [in, kept, dropped, changed]
    fields: dict[int, set[str]] = field(default_factory=dict)
    nodes: set[str] = field(default_factory=set)
    examples: list[Example] | None = None

    def reach(self, i: int) -> None:
        """Note the fields of the rows reaching step ``i`` (the first batch with rows checks the recipe)."""
        if self.records:
            self.fields[i] = set().union(*(r.data for r in self.records))

    def count(self, i: int, n_in: int, kept: int, dropped: int, changed: int = 0) -> None:
        self.counts[i] = [n_in, kept, dropped, changed]

    def keep(self, kept: list[Record]) -> None:
        at = {id(r): p for r, p in zip(self.records, self.pos, strict=True)}
        self.records, self.pos = kept, [at[id(r)] for r in kept]


def dump(parts: list[Part]):
    import pyarrow as pa

    return pa.table({"batch": pa.array([p.batch for p in parts], pa.int64()),
                     "part": pa.array([pickle.dumps(p, protocol=pickle.HIGHEST_PROTOCOL) for p in parts],
                                      pa.large_binary())})


def load(table) -> list[Part]:
    return [pickle.loads(b) for b in table.column("part").to_pylist()]


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


# --- maps over parts (Ray Data map_batches, one reader batch per call) -----------------------------------


def run_steps(table, steps: list, ctx: StepContext):
    """Row-wise steps ``[(index, spec), ...]`` in order over each part."""
    parts = load(table)
    for part in parts:
        part.nodes.add(_node())
        for i, spec in steps:
            part.reach(i)
            kept, dropped, row = apply_step(part.records, spec, ctx, f"{i + 1}:{spec.step}", STEPS[type(spec)])
            part.keep(kept)
            part.rejected += dropped
            part.count(i, row.n_in, row.kept, row.dropped, row.changed)
    return dump(parts)


def drop_rows(table, i: int, spec, reasons: dict[int, str]):
    """A dedup step's decision applied: rows whose position has a reason are set aside with it."""
    parts = load(table)
    name = f"{i + 1}:{spec.step}"
    for part in parts:
        part.nodes.add(_node())
        part.reach(i)
        n_in, kept = len(part.records), []
        for rec, p in zip(part.records, part.pos, strict=True):
            if p in reasons:
                part.rejected.append(Rejected(rec.source, name, reasons[p], rec.data))
            else:
                kept.append(rec)
        part.keep(kept)
        part.count(i, n_in, len(kept), n_in - len(kept))
    return dump(parts)


def map_examples(table, cfg, kind):
    """The kept rows as task examples; rows that do not map are set aside after the steps' rejects. ``kind``
    is the task kind's class, registered here as the entry points register it in the driver."""
    from tunesmith.config.kinds import register

    register(kind)
    parts = load(table)
    for part in parts:
        part.nodes.add(_node())
        part.examples, unmapped = to_examples(part.records, cfg)
        part.rejected += unmapped
        part.records, part.pos = [], []
    return dump(parts)


def exact_keys(table, spec, buckets: int) -> dict[str, np.ndarray]:
    """Per row the 64-bit hash of its normalised text (as the local index hashes it), its position and
    ``file:line`` (a first row's, to name it in its duplicates' reasons)."""
    h, pos, src = [], [], []
    for part in load(table):
        h.append(text_hash(normalized_keys(part.records, spec)))
        pos.append(np.asarray(part.pos, dtype=np.int64))
        src += [r.source for r in part.records]
    h, pos = np.concatenate(h or [np.empty(0, np.uint64)]), np.concatenate(pos or [np.empty(0, np.int64)])
    return {"bucket": (h % np.uint64(buckets)).astype(np.int64), "hash": h, "pos": pos,
            "source": np.asarray(src, dtype=object)}


def near_keys(table, spec, bands: int, rows: int) -> dict[str, np.ndarray]:
    """Per row with shingles and per LSH band: ``(band, key, position)``, the key made as the local index makes it."""
    out_band, out_key, out_pos = [], [], []
    for part in load(table):
        if not part.records:
            continue
        sh = shingle([field_text(r, spec.fields) for r in part.records], spec.unit, spec.ngram)
        keys = band_keys(signatures(sh, spec.num_perm, spec.seed), bands, rows)
        nonempty = np.diff(sh.offsets) > 0
        pos = np.asarray(part.pos, dtype=np.int64)[nonempty]
        for b in range(bands):
            out_band.append(np.full(len(pos), b, dtype=np.int64))
            out_key.append(keys[nonempty, b].astype(np.int64))
            out_pos.append(pos)
    if not out_pos:
        return {"band": np.empty(0, np.int64), "key": np.empty(0, np.int64), "pos": np.empty(0, np.int64)}
    return {"band": np.concatenate(out_band), "key": np.concatenate(out_key), "pos": np.concatenate(out_pos)}


def rows_at(table, wanted: np.ndarray, spec=None) -> dict[str, np.ndarray]:
    """``file:line`` of the rows at the ``wanted`` positions and, given a near-dedup spec, their shingle ids."""
    pos, src, ids = [], [], []
    for part in load(table):
        hit = np.flatnonzero(np.isin(np.asarray(part.pos, dtype=np.int64), wanted))
        pos += [part.pos[k] for k in hit]
        src += [part.records[k].source for k in hit]
        if spec is not None and len(hit):
            sh = shingle([field_text(part.records[k], spec.fields) for k in hit], spec.unit, spec.ngram)
            ids += [sh.of(j).tobytes() for j in range(len(hit))]
    out = {"pos": np.asarray(pos, dtype=np.int64), "source": np.asarray(src, dtype=object)}
    if spec is not None:
        out["shingles"] = np.asarray(ids, dtype=object)
    return out


# --- group-by functions (one group of rows each) ------------------------------------------------------


def exact_firsts(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows of one hash bucket: each row whose hash an earlier row has, with that hash's first row's
    ``file:line``."""
    order = np.lexsort((group["pos"], group["hash"]))
    h, pos = group["hash"][order], group["pos"][order]
    start = np.ones(len(h), dtype=bool)
    start[1:] = h[1:] != h[:-1]
    first = order[start][np.cumsum(start) - 1]
    return {"pos": pos[~start].astype(np.int64), "first": np.asarray(group["source"], dtype=object)[first[~start]]}


def band_candidates(group: dict[str, np.ndarray], cap: int) -> dict[str, np.ndarray]:
    """Rows of one LSH band: ``(earlier, later)`` pairs sharing a key, each row paired with the earlier of its
    bucket's first ``cap`` rows (the local index reads at most ``cap`` rows of a bucket per lookup)."""
    order = np.lexsort((group["pos"], group["key"]))
    key, pos = group["key"][order], group["pos"][order]
    start = np.ones(len(key), dtype=bool)
    start[1:] = key[1:] != key[:-1]
    run_start = np.flatnonzero(start)[np.cumsum(start) - 1]
    n = np.minimum(np.arange(len(key)) - run_start, cap)  # earlier partners of each row
    first = np.repeat(run_start, n) + np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    return {"a": pos[first].astype(np.int64), "b": np.repeat(pos, n).astype(np.int64)}
