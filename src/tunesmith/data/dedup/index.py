"""Dedup state for the streaming data stage: what each dedup step keeps between batches.

Exact dedup keeps an 8-byte hash per distinct row in memory and its position in a file; near dedup keeps, per
LSH band, the 4-byte band key of each row in memory and its position in a file (``SortedRuns`` with ``spill``:
a lookup reads only the positions of keys it finds), plus a 20-byte sketch per row (``jaccard.Sketches``), and
writes each row's shingle set and ``file:line`` to a file on disk, read back only for the rows that share a band
key with a new batch and whose sketch says the pair could reach the threshold. Rows are numbered by the order in
which they reach the step, so "the first" and "earlier" mean the same as in the in-memory steps, and a batch is
decided by the same functions as all rows at once (``minhash.lsh_groups``, ``group_matches``, ``best_earlier``).
"""

from __future__ import annotations

import mmap
import os
from array import array
from pathlib import Path

import numpy as np

from tunesmith.data.dedup.jaccard import SKETCH_WORDS, Sketches, sketches, spans
from tunesmith.data.dedup.minhash import (
    Shingles,
    band_keys,
    distinct,
    group_matches,
    keyed_rows,
    lsh_groups,
    lsh_params,
    near_reason,
    shingle,
    signatures,
    word_ids,
)
from tunesmith.records import Record, Rejected, field_text


class SpillLog:
    """Variable-size byte records appended to a file, each padded with NUL bytes to a multiple of 8 so that its
    place is a 4-byte count of 8-byte words (files up to 32 GB); record ``i`` is read back with one ``pread``."""

    def __init__(self, path: Path):
        self.fh = open(path, "ab+")  # noqa: SIM115 - closed by close()
        self.ends = array("I")  # in 8-byte words

    def extend(self, items: list[bytes]) -> None:
        padded = [item + b"\0" * (-len(item) % 8) for item in items]
        self.fh.write(b"".join(padded))
        end = self.ends[-1] if self.ends else 0
        for item in padded:
            end += len(item) // 8
            self.ends.append(end)

    def get(self, i: int) -> bytes:
        """Record ``i`` with its padding."""
        self.fh.flush()
        lo = 8 * self.ends[i - 1] if i else 0
        return os.pread(self.fh.fileno(), 8 * self.ends[i] - lo, lo)

    def __len__(self) -> int:
        return len(self.ends)

    def close(self) -> None:
        self.fh.close()


class SortedRuns:
    """Keys (with values, optionally) as a few sorted runs, merged by size tiers: a run is merged into the one
    before it while that one is less than twice its size (a binary counter), so there are O(log n) runs and each
    key is merged O(log n) times, up to ``LARGEST`` keys a run (past that, one more run per ``LARGEST`` keys).
    Among equal keys the one added first stays first. With ``spill`` (a folder), the values of a run of
    ``SPILL`` keys or more live in a file there and are read only where a lookup hits (``SpilledValues``): the
    process holds the keys it searches, not what they point to."""

    LARGEST = 1 << 22  # keys in a run made by merging: bounds a merge's extra memory (~50 MB), costs a search a run
    SPILL = 1 << 18  # keys in a run whose values go to ``spill``: what stays in memory is under 2 * SPILL values

    def __init__(self, dtype=np.uint64, value_dtype=None, spill: Path | None = None):
        self.dtype, self.value_dtype, self.spill = dtype, value_dtype, spill
        self.runs: list[tuple[np.ndarray, np.ndarray | SpilledValues | None]] = []
        self._files = 0

    def add(self, keys: np.ndarray, values: np.ndarray | None = None) -> None:
        if not len(keys):
            return
        keys = np.asarray(keys).astype(self.dtype, copy=False)
        order = np.argsort(keys, kind="stable")
        vals = None if self.value_dtype is None else np.asarray(values)[order].astype(self.value_dtype)
        self.runs.append(self._kept(keys[order], vals))
        while len(self.runs) >= 2 and len(self.runs[-2][0]) < 2 * len(self.runs[-1][0]) \
                and len(self.runs[-2][0]) + len(self.runs[-1][0]) <= self.LARGEST:
            (k1, v1), (k2, v2) = self.runs[-2], self.runs.pop()
            self.runs[-1] = self._kept(*_merged(k1, _loaded(v1), k2, _loaded(v2)))
            for v in (v1, v2):
                if isinstance(v, SpilledValues):
                    v.drop()

    def _kept(self, keys: np.ndarray, vals: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | SpilledValues | None]:
        """A run as stored: its values in a file of ``spill`` once it is large enough."""
        if vals is None or self.spill is None or len(keys) < self.SPILL:
            return keys, vals
        self._files += 1
        return keys, SpilledValues(self.spill / f"{self._files}.bin", vals)

    def first(self, keys: np.ndarray) -> np.ndarray:
        """The value stored first under each key, or -1."""
        out = np.full(len(keys), -1, dtype=np.int64)
        keys = np.asarray(keys).astype(self.dtype, copy=False)
        for k, v in self.runs:  # runs in the order they were added: an earlier hit stands
            at = np.minimum(np.searchsorted(k, keys), len(k) - 1)
            hit = (out < 0) & (k[at] == keys)
            out[hit] = v[at[hit]] if v is not None else 0
        return out

    def every(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(query, value)``: every value stored under ``keys[query]``, for each query (runs with values only)."""
        keys = np.asarray(keys).astype(self.dtype, copy=False)
        qs, vs = [], []
        for k, v in self.runs:
            a = np.searchsorted(k, keys, "left")
            n = np.searchsorted(k, keys, "right") - a
            qs.append(np.repeat(np.arange(len(keys)), n))
            vs.append(v[spans(a, n)])
        if not qs:
            return np.empty(0, np.int64), np.empty(0, self.value_dtype)
        return np.concatenate(qs), np.concatenate(vs)

    def __len__(self) -> int:
        return sum(len(k) for k, _ in self.runs)

    @property
    def nbytes(self) -> int:
        """What the runs hold in memory (spilled values are in files)."""
        return sum(k.nbytes + (v.nbytes if isinstance(v, np.ndarray) else 0) for k, v in self.runs)

    def close(self) -> None:
        """Every run let go, its files removed."""
        for _, v in self.runs:
            if isinstance(v, SpilledValues):
                v.drop()
        self.runs = []


class SpilledValues:
    """A run's values in a file: an index reads only the values it asks for, through a mapping that is gone
    when it returns, so none of them stays in the process (the page cache may keep them; the system can take
    those pages back whenever it needs them)."""

    def __init__(self, path: Path, values: np.ndarray):
        path.parent.mkdir(parents=True, exist_ok=True)
        values.tofile(path)
        self.path, self.dtype = path, values.dtype

    def __getitem__(self, at: np.ndarray) -> np.ndarray:
        at = np.asarray(at)
        if not at.size:
            return np.empty(0, self.dtype)
        with open(self.path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = np.frombuffer(mapped, dtype=self.dtype)
            out = view[at]  # a copy: the mapping can close
            del view
        return out

    def load(self) -> np.ndarray:
        return np.fromfile(self.path, dtype=self.dtype)

    def drop(self) -> None:
        self.path.unlink(missing_ok=True)


def _loaded(values):
    return values.load() if isinstance(values, SpilledValues) else values


class SketchStore:
    """Every indexed row's ``jaccard.Sketches`` (20 bytes a row), in blocks of ``BLOCK`` rows so that growing never
    copies what is stored; near dedup reads them for every earlier row that shares a band key with a batch."""

    BLOCK = 1 << 20

    def __init__(self):
        self.masks: list[np.ndarray] = []
        self.sizes: list[np.ndarray] = []
        self.n = 0

    def extend(self, sk: Sketches) -> None:
        at = 0
        while at < len(sk):
            block, off = divmod(self.n, self.BLOCK)
            if block == len(self.masks):
                self.masks.append(np.zeros((self.BLOCK, SKETCH_WORDS), dtype=np.uint64))
                self.sizes.append(np.zeros(self.BLOCK, dtype=np.uint32))
            take = min(self.BLOCK - off, len(sk) - at)
            self.masks[block][off : off + take] = sk.masks[at : at + take]
            self.sizes[block][off : off + take] = sk.sizes[at : at + take]
            self.n, at = self.n + take, at + take

    def take(self, pos: np.ndarray) -> Sketches:
        out = Sketches(np.empty((len(pos), SKETCH_WORDS), dtype=np.uint64), np.empty(len(pos), dtype=np.uint32))
        block = pos // self.BLOCK
        for b in distinct(block).tolist():
            sel = block == b
            out.masks[sel] = self.masks[b][pos[sel] % self.BLOCK]
            out.sizes[sel] = self.sizes[b][pos[sel] % self.BLOCK]
        return out

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes + s.nbytes for m, s in zip(self.masks, self.sizes, strict=True))


def _merged(k1: np.ndarray, v1, k2: np.ndarray, v2) -> tuple[np.ndarray, np.ndarray | None]:
    """Two sorted runs as one, ``k1``'s before ``k2``'s among equal keys: each key of ``k2`` goes where a
    binary search puts it, those of ``k1`` fill the rest (no sort, and no copy beyond the result)."""
    at = np.searchsorted(k1, k2, side="right") + np.arange(len(k2))
    first = np.ones(len(k1) + len(k2), dtype=bool)
    first[at] = False
    keys = np.empty(len(first), dtype=k1.dtype)
    keys[at], keys[first] = k2, k1
    if v1 is None:
        return keys, None
    vals = np.empty(len(first), dtype=v1.dtype)
    vals[at], vals[first] = v2, v1
    return keys, vals


def text_hash(texts: list[str]) -> np.ndarray:
    """A 64-bit hash per text (blake2b, as :func:`minhash.word_ids` hashes a word); two texts share one about once
    in 10^19 pairs."""
    return word_ids(texts)


def _source(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "surrogatepass")


def normalized_key(rec: Record, spec) -> str:
    """The text ``exact_dedup`` (``spec``: its ``ExactDedupStep``) compares on every engine: the step's fields
    joined, lower-cased and whitespace-collapsed when ``normalize`` is on."""
    key = field_text(rec, spec.fields)
    return " ".join(key.lower().split()) if spec.normalize else key


def exact_keys(records: list[Record], spec) -> np.ndarray:
    """What ``exact_dedup`` compares of each row: the 64-bit hash of its normalised text."""
    return text_hash([normalized_key(r, spec) for r in records])


def near_keys(records: list[Record], spec) -> tuple[Shingles, np.ndarray]:
    """What ``near_dedup`` compares of each row: its shingle set and its LSH band keys."""
    sh = shingle([field_text(r, spec.fields) for r in records], spec.unit, spec.ngram)
    return sh, band_keys(signatures(sh, spec.num_perm, spec.seed), *lsh_params(spec.threshold, spec.num_perm))


def rows_of(keys, at: np.ndarray):
    """The rows ``at`` of ``exact_keys`` or ``near_keys`` made for more rows."""
    if isinstance(keys, np.ndarray):
        return keys[at]
    sh, bands = keys
    return sh.take(at), bands[at]


class ExactIndex:
    """``exact_dedup`` over batches: a row is dropped when its (normalised) text hashes like an earlier one.
    ``given``: the batch's hashes when another process made them (``stream.HeadSteps``)."""

    def __init__(self, spec, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        self.spec, self.given = spec, None
        self.hashes = SortedRuns(np.uint64, np.uint32, spill=workdir / "positions")
        self.sources = SpillLog(workdir / "exact_sources.bin")

    def __call__(self, records: list[Record], spec, ctx) -> tuple[list[Record], list[Rejected]]:
        h, self.given = (self.given if self.given is not None else exact_keys(records, spec)), None
        earlier = self.hashes.first(h)
        _, first_in_batch = np.unique(h, return_index=True)
        new = np.zeros(len(h), dtype=bool)
        new[first_in_batch] = True
        new &= earlier < 0
        fresh = np.flatnonzero(new)
        self.hashes.add(h[fresh], len(self.sources) + np.arange(len(fresh)))
        self.sources.extend([records[i].source.encode("utf-8", "surrogatepass") for i in fresh])
        first = self.hashes.first(h)
        kept, dropped = [], []
        for i, rec in enumerate(records):
            if new[i]:
                kept.append(rec)
            else:
                src = _source(self.sources.get(int(first[i])))
                dropped.append(Rejected(rec.source, "", f"exact duplicate of {src}", rec.data))
        return kept, dropped

    def close(self) -> None:
        """The file closed and the index let go (the split that follows the stream needs that memory)."""
        self.sources.close()
        self.hashes.close()


class NearIndex:
    """``near_dedup`` over batches: each batch's LSH band keys are looked up among every earlier row's (all of
    them, whatever the bucket size), and the batch is decided against those rows exactly as all rows at once
    would be: a row is dropped when any earlier row has a shingle-set Jaccard at or above the threshold, and
    its reason names the most similar one."""


    def __init__(self, spec, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        self.spec, self.given = spec, None  # given: the batch's near_keys when another process made them
        self.bands, self.rows = lsh_params(spec.threshold, spec.num_perm)
        self.index = [SortedRuns(np.uint32, np.uint32, spill=workdir / f"band{b}") for b in range(self.bands)]
        self.log = SpillLog(workdir / "near_rows.bin")  # per row: shingle count, shingles, file:line
        self.sketches = SketchStore()  # per row: what bounds its Jaccard, so few rows are read back

    def __call__(self, records: list[Record], spec, ctx) -> tuple[list[Record], list[Rejected]]:
        (sh, keys), self.given = (self.given if self.given is not None else near_keys(records, spec)), None
        base = len(self.log)
        pos = base + np.flatnonzero(np.diff(sh.offsets) > 0)
        self.sketches.extend(sketches(sh))  # the batch's too: read like the earlier rows' while it is decided
        i, j, sim = self._matches(sh, keys[pos - base], pos, base, spec.threshold)
        for b, runs in enumerate(self.index):
            runs.add(keys[pos - base, b], pos)
        self.log.extend([_row_bytes(sh.of(k), r.source) for k, r in enumerate(records)])
        best = {int(b): (int(a), s) for a, b, s in zip(i.tolist(), j.tolist(), sim.tolist(), strict=True)}
        kept, dropped = [], []
        for k, rec in enumerate(records):
            if base + k not in best:
                kept.append(rec)
                continue
            a, s = best[base + k]
            src = records[a - base].source if a >= base else self._read(a)[1]
            dropped.append(Rejected(rec.source, "", near_reason(src, s), rec.data))
        return kept, dropped

    def _matches(self, sh: Shingles, keys: np.ndarray, pos: np.ndarray, base: int,
                 threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The batch's matches among its rows and the earlier ones; its working arrays (every earlier row of every
        bucket it touches) are gone when this returns, before the index grows (at 10M rows their peaks met)."""
        band, key, at = keyed_rows(keys, pos)
        eb, ek, ep = self._earlier(keys)
        groups = lsh_groups(np.concatenate([band, eb]), np.concatenate([key, ek]), np.concatenate([at, ep]))
        del band, key, at, eb, ek, ep
        index = distinct(groups.members)
        return group_matches(groups, index, _IndexedSets(self, index, sh, base), index >= base, threshold)

    def _earlier(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(band, key, position)`` of every earlier row sharing a band key with one of ``keys``."""
        bands, out_k, out_p = [], [], []
        for b, runs in enumerate(self.index):
            uniq = distinct(keys[:, b])
            q, found = runs.every(uniq)
            bands.append(np.full(len(found), b, dtype=np.int64))
            out_k.append(uniq[q].astype(np.int64))
            out_p.append(found.astype(np.int64))
        return np.concatenate(bands), np.concatenate(out_k), np.concatenate(out_p)

    def _sets(self, index: np.ndarray, sh: Shingles, base: int) -> Shingles:
        """The shingle sets of the rows at ``index`` (ascending): earlier rows' from disk, the batch's from ``sh``."""
        arrays = [self._read(int(p))[0] if p < base else sh.of(int(p) - base) for p in index.tolist()]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        ids = np.concatenate(arrays) if arrays else np.empty(0, np.uint64)
        return Shingles(ids.astype(np.uint64, copy=False), offsets)

    def _read(self, p: int) -> tuple[np.ndarray, str]:
        raw = self.log.get(p)
        n = int.from_bytes(raw[:8], "little")
        return np.frombuffer(raw, dtype=np.uint64, count=n, offset=8), _source(raw[8 + 8 * n :])

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.index) + 4 * len(self.log) + self.sketches.nbytes

    def close(self) -> None:
        """The files closed and the index let go (the split after the stream needs the memory)."""
        self.log.close()
        for runs in self.index:
            runs.close()
        self.index, self.sketches = [], SketchStore()


class _IndexedSets:
    """``group_matches``' view of the rows at ``index`` (ascending; the batch's from ``base`` on): their sketches
    from memory, their shingle sets read back (earlier rows) or taken from the batch only when asked for."""

    def __init__(self, near: NearIndex, index: np.ndarray, sh: Shingles, base: int):
        self.near, self.index, self.sh, self.base = near, index, sh, base
        self.sketch = near.sketches.take(index)

    def load(self, at: np.ndarray) -> Shingles:
        return self.near._sets(self.index[at], self.sh, self.base)


def _row_bytes(ids: np.ndarray, source: str) -> bytes:
    return len(ids).to_bytes(8, "little") + ids.tobytes() + source.encode("utf-8", "surrogatepass")
