"""Exact Jaccard similarity of shingle sets (near dedup's check, ``minhash.group_matches``): of pairs, by one
sort of the pairs' shingles tagged with the pair, and of every pair of a large group at once, by a matrix product
of the members' 0/1 shingle matrix. Shingles keep their 64-bit identity on both paths, and the similarity is the
same float from the same counts, so a pair scores alike whichever path checks it.

Before either, :func:`jaccard_bound` drops the pairs that cannot reach the threshold from a 20-byte sketch per row
(which of 128 buckets its shingles fall in, and how many distinct shingles it has): an upper bound, never below the
exact Jaccard, so no pair at or above the threshold is lost and the rows whose sets must be read are few.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_MASK32 = np.uint64(0xFFFFFFFF)


def spans(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Every index of the ranges ``[starts[k], starts[k] + counts[k])``, one range after another."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.repeat(np.asarray(starts, dtype=np.int64) - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())


@dataclass
class Shingles:
    """All texts' shingle ids in one flat array; text ``i`` owns ``ids[offsets[i]:offsets[i+1]]``."""

    ids: np.ndarray  # uint64
    offsets: np.ndarray  # int64, len = n_texts + 1

    def of(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    def take(self, at: np.ndarray) -> Shingles:
        """The texts ``at``, as their own ``Shingles``."""
        counts = np.diff(self.offsets)[at]
        offsets = np.zeros(len(at) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return Shingles(self.ids[spans(self.offsets[at], counts)], offsets)


SKETCH_WORDS = 2  # 128 buckets


@dataclass
class Sketches:
    """Per row: a bit per shingle bucket its shingles fall in (``SKETCH_WORDS`` uint64 words) and its count of
    distinct shingles: what :func:`jaccard_bound` needs, small enough to keep for every row of a stream."""

    masks: np.ndarray  # (n, SKETCH_WORDS) uint64
    sizes: np.ndarray  # (n,) uint32

    def __len__(self) -> int:
        return len(self.sizes)

    def take(self, at: np.ndarray) -> Sketches:
        return Sketches(self.masks[at], self.sizes[at])


def sketches(sh: Shingles) -> Sketches:
    """The sketch of every text of ``sh`` (an empty text: no bits, size 0)."""
    n = len(sh.offsets) - 1
    owner = np.repeat(np.arange(n, dtype=np.int64), np.diff(sh.offsets))
    masks = np.zeros((n, SKETCH_WORDS), dtype=np.uint64)
    code = distinct(owner * (64 * SKETCH_WORDS) + _bucket(sh.ids))  # each (text, bucket) once: adding is or-ing
    np.add.at(masks, (code // (64 * SKETCH_WORDS), (code // 64) % SKETCH_WORDS),
              np.uint64(1) << (code % 64).astype(np.uint64))
    return Sketches(masks, _distinct_counts(sh.ids, owner, n))


def _distinct_counts(ids: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """Each text's count of distinct shingles: one sort of the ids mixed with their text (a repeat within a text
    mixes alike), then only the few values that recur are told apart exactly by text and id."""
    mixed = ids ^ (owner.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    ordered = np.sort(mixed)
    recurring = ordered[1:][ordered[1:] == ordered[:-1]]
    sizes = np.bincount(owner, minlength=n)
    if len(recurring):
        recurring = distinct(recurring)
        near = np.minimum(np.searchsorted(recurring, mixed), len(recurring) - 1)
        at = np.flatnonzero(recurring[near] == mixed)
        order = np.lexsort((ids[at], owner[at]))
        o, i = owner[at][order], ids[at][order]
        repeat = np.zeros(len(o), dtype=bool)
        repeat[1:] = (o[1:] == o[:-1]) & (i[1:] == i[:-1])
        sizes -= np.bincount(o[repeat], minlength=n)
    return sizes.astype(np.uint32)


def _bucket(ids: np.ndarray) -> np.ndarray:
    """0..127: the top bits of a multiplicative hash of the shingle id."""
    return ((ids * np.uint64(0xD6E8FEB86659FD93)) >> np.uint64(57)).astype(np.int64)


def jaccard_bound(sk: Sketches, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """An upper bound on the Jaccard of rows ``a`` and ``b`` (arrays that broadcast): a shingle of ``a`` in a
    bucket where ``b`` has none is not shared, so the intersection is at most ``|a|`` less the buckets only ``a``
    fills (and the same from ``b``'s side). Computed by the same ratio as the exact value, so never below it."""
    ma, mb = sk.masks[a], sk.masks[b]
    only_a = np.bitwise_count(ma & ~mb).sum(axis=-1, dtype=np.int64)
    only_b = np.bitwise_count(mb & ~ma).sum(axis=-1, dtype=np.int64)
    sa, sb = sk.sizes[a].astype(np.int64), sk.sizes[b].astype(np.int64)
    inter = np.minimum(sa - only_a, sb - only_b)
    return _ratio(inter, sa + sb - inter)


def _unique_sets(sh: Shingles, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each of ``docs``' shingle sets without repeats, as dense ids (64-bit identity kept): ``(ids, starts)``
    with doc ``k``'s set in ``ids[starts[k]:starts[k+1]]``."""
    picked = sh.take(docs)
    counts = np.diff(picked.offsets)
    dense = _dense(picked.ids)
    key = distinct((np.repeat(np.arange(len(docs), dtype=np.uint64), counts) << np.uint64(32))
                    | dense.astype(np.uint64))
    starts = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(np.bincount((key >> np.uint64(32)).astype(np.int64), minlength=len(docs)), out=starts[1:])
    return key & _MASK32, starts


def distinct(values: np.ndarray) -> np.ndarray:
    """``np.unique`` by one sort (numpy 2.4's ``np.unique`` hashes, ~50x slower on 64-bit ids)."""
    values = np.sort(np.asarray(values).ravel())
    return values[np.r_[True, values[1:] != values[:-1]]] if len(values) else values


def _dense(ids: np.ndarray) -> np.ndarray:
    """Each id's rank among the distinct ids (equal ids, equal ranks), by one sort."""
    order = np.argsort(ids)
    step = np.ones(len(ids), dtype=np.int64)
    if len(ids):
        step[0] = 0
        step[1:] = ids[order][1:] != ids[order][:-1]
    dense = np.empty(len(ids), dtype=np.int64)
    dense[order] = np.cumsum(step)
    return dense


def _ratio(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """Jaccard from counts, computed alike on every path (two empty sets count as equal)."""
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def exact_jaccard(sh: Shingles, pairs: np.ndarray, chunk: int = 1 << 21) -> np.ndarray:
    """Jaccard similarity of the shingle sets of each pair ``(i, j)`` of texts, on arrays: both sides of every
    pair are tagged with the pair's index and sorted; an adjacent equal value is one shared shingle. Pairs are
    taken about ``chunk`` shingles at a time, which bounds the memory."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    sizes = np.diff(sh.offsets)
    work = np.cumsum(sizes[pairs[:, 0]] + sizes[pairs[:, 1]]) if len(pairs) else np.zeros(0, np.int64)
    if len(pairs) > 1 and work[-1] > chunk:
        cuts = np.unique(np.searchsorted(work, np.arange(chunk, work[-1], chunk), side="right"))
        bounds = [0, *[int(c) for c in cuts if 0 < c < len(pairs)], len(pairs)]
        return np.concatenate([_pair_jaccard(sh, pairs[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    return _pair_jaccard(sh, pairs)


def _pair_jaccard(sh: Shingles, pairs: np.ndarray) -> np.ndarray:
    if len(pairs) == 0:
        return np.empty(0, dtype=np.float64)
    docs = distinct(pairs)
    vals, starts = _unique_sets(sh, docs)
    size = np.diff(starts)
    pos = np.searchsorted(docs, pairs)
    side = pos.ravel()
    n_each = size[side]
    tag = np.repeat(np.repeat(np.arange(len(pairs), dtype=np.uint64), 2), n_each)
    both = np.sort((tag << np.uint64(32)) | vals[spans(starts[side], n_each)])
    shared = both[1:][both[1:] == both[:-1]]
    inter = np.bincount((shared >> np.uint64(32)).astype(np.int64), minlength=len(pairs))
    return _ratio(inter, size[pos[:, 0]] + size[pos[:, 1]] - inter)


class _Ones:
    """A 0/1 matrix with ones at ``(rows, cols)``: its columns that many rows share as a dense float32 block
    (a bucket's rows share most of their shingles), the others sparse."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]):
        from scipy.sparse import csr_matrix

        m, width = shape
        heavy = np.bincount(cols, minlength=width) * 16 >= m if m * width > 1 << 22 else np.ones(width, dtype=bool)
        h = heavy[cols]
        new = np.cumsum(heavy) - 1
        self.dense = np.zeros((m, int(heavy.sum())), dtype=np.float32)
        self.dense[rows[h], new[cols[h]]] = 1
        light = np.cumsum(~heavy) - 1
        self.sparse = (csr_matrix((np.ones(int((~h).sum()), np.float32), (rows[~h], light[cols[~h]])),
                                  shape=(m, int((~heavy).sum()))) if (~h).any() else None)

    def rows(self, at) -> tuple:
        return self.dense[at], None if self.sparse is None else self.sparse[at]


def _take(rows: tuple, at: np.ndarray) -> tuple:
    return rows[0][at], None if rows[1] is None else rows[1][at]


def _counts(a: tuple, b: tuple) -> np.ndarray:
    """``a @ b.T`` of two row selections of one ``_Ones``, as exact integers."""
    out = a[0] @ b[0].T
    if a[1] is not None:
        out = out + (a[1] @ b[1].T).toarray()
    return np.rint(out).astype(np.int64)


def large_group_matches(members: np.ndarray, of_group, sh: Shingles, query: np.ndarray, threshold: float,
                        best: bool, block: int = 512):
    """Pairs ``(earlier, later query)`` of a large group's members (or of overlapping groups', ``of_group`` saying
    which rows share one) at or above ``threshold``, each query's best with ``best``: from the intersection counts
    ``A[rows] @ A[queries].T`` of the members' 0/1 shingle matrix, a block of earlier rows at a time."""
    vals, starts = _unique_sets(sh, members)
    size = np.diff(starts)
    doc = np.repeat(np.arange(len(members)), size)
    shared = np.bincount(vals.astype(np.int64))[vals.astype(np.int64)] >= 2  # the others add to no intersection
    doc, vals = doc[shared], _dense(vals[shared])
    mat = _Ones(doc, vals, (len(members), int(vals.max()) + 1 if len(vals) else 1))
    inc = None if of_group is None else _Ones(*of_group, (len(members), int(of_group[1].max()) + 1))
    cols = np.flatnonzero(query[members])
    col_sets = mat.rows(cols)
    col_groups = None if inc is None else inc.rows(cols)
    hits_a, hits_b, hits_s = [], [], []
    best_sim, best_row = np.full(len(cols), -1.0), np.full(len(cols), -1, dtype=np.int64)
    for lo in range(0, int(cols.max()), block):
        live = cols > lo  # a query row is compared with the rows before it only
        rows, right = slice(lo, lo + block), cols[live]
        inter = _counts(mat.rows(rows), _take(col_sets, live))
        sim = _ratio(inter, size[rows, None] + size[right][None, :] - inter)
        sim[np.arange(lo, lo + len(sim))[:, None] >= right[None, :]] = -1.0
        if inc is not None:
            sim[_counts(inc.rows(rows), _take(col_groups, live)) == 0] = -1.0  # in no group together
        if best:
            row = np.argmax(sim, axis=0)
            top = sim[row, np.arange(sim.shape[1])]
            better = top > best_sim[live]
            idx = np.flatnonzero(live)[better]
            best_sim[idx], best_row[idx] = top[better], lo + row[better]
        else:
            r, c = np.nonzero(sim >= threshold)
            hits_a.append(lo + r)
            hits_b.append(cols[live][c])
            hits_s.append(sim[r, c])
    if best:
        hit = best_sim >= threshold
        return members[best_row[hit]], members[cols[hit]], best_sim[hit]
    if not hits_a:
        return members[:0], members[:0], np.empty(0)
    return members[np.concatenate(hits_a)], members[np.concatenate(hits_b)], np.concatenate(hits_s)
