"""Near-duplicate detection with MinHash + LSH banding, vectorised with numpy: the one near dedup of every engine.

Pipeline: shingles (word or char n-grams) → 64-bit ids → ``num_perm`` MinHash values per text (multiply-shift
hashing, one ``np.minimum.reduceat`` per chunk) → one 32-bit key per LSH band → groups of rows sharing a key
(:func:`lsh_groups`, any size) → exact Jaccard of every earlier/later pair in a group whose upper bound from two
20-byte sketches reaches the threshold (:func:`group_matches`: pair by pair in small groups, a matrix product in
large ones) → per row its best earlier match (:func:`best_earlier`).
The in-memory step, the streaming index and the Ray engine all run these three functions, on all rows at once, a
batch against the rows before it, or one partition of the band shuffle: the matches, hence the kept rows and the
reasons, are the same whatever the batch size, bucket size or engine.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from tunesmith.data.dedup.jaccard import (
    Shingles,
    Sketches,
    distinct,
    exact_jaccard,
    jaccard_bound,
    large_group_matches,
    sketches,
)

_WORD_SPLIT = r"[^\p{L}\p{N}\p{M}_]+"
_MIX = np.uint64(0x9E3779B97F4A7C15)


def _workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _units(texts: list[str], unit: str) -> tuple[np.ndarray, np.ndarray]:
    """Integer ids of each text's words (Arrow's C++ regex split, in threads; each distinct word hashed once)
    or characters (code points)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if unit == "char":
        arr = pc.utf8_lower(pa.array(texts, type=pa.large_string()))
        arr = pc.replace_substring_regex(pc.utf8_trim_whitespace(arr), r"\s+", " ")
        lengths = pc.utf8_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
        joined = "".join(arr.to_pylist())
        return np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64), lengths
    step = -(-len(texts) // _workers()) or 1
    parts = [pa.array(texts[lo : lo + step], type=pa.large_string()) for lo in range(0, len(texts), step)]

    def split(arr):  # Arrow releases the GIL, so parts run on separate cores
        lists = pc.split_pattern_regex(pc.utf8_lower(arr), _WORD_SPLIT)
        return pc.list_flatten(lists), pc.list_parent_indices(lists).to_numpy()

    with ThreadPoolExecutor(len(parts) or 1) as pool:
        done = list(pool.map(split, parts))
    if not done:
        return np.empty(0, dtype=np.uint64), np.zeros(len(texts), dtype=np.int64)
    flat = pa.concat_arrays([f for f, _ in done])
    owner = np.concatenate([o + i * step for i, (_, o) in enumerate(done)])
    nonempty = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
    encoded = pc.dictionary_encode(flat)
    ids = word_ids(encoded.dictionary.to_pylist())[encoded.indices.to_numpy()][nonempty]
    lengths = np.bincount(owner[nonempty], minlength=len(texts)).astype(np.int64)
    return ids, lengths


def word_ids(words: list[str]) -> np.ndarray:
    """A 64-bit id per word from its text alone, so that batches read apart agree on every word's id."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(w.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
         for w in words], dtype=np.uint64,
    ).reshape(-1)


def shingle(texts: list[str], unit: str = "word", n: int = 2) -> Shingles:
    """Word or character n-grams of each (lower-cased) text as 64-bit ids (a text may repeat one).

    A text shorter than ``n`` units becomes one shingle of all its units; an empty text has none.
    """
    tok, lengths = _units(list(texts), unit)
    starts = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    counts = np.where(lengths >= n, lengths - n + 1, (lengths > 0).astype(np.int64))
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    out = np.empty(offsets[-1], dtype=np.uint64)
    # texts with >= n units: every window, combined from shifted slices of the flat array
    m = len(tok) - n + 1
    if m > 0:
        h = np.zeros(m, dtype=np.uint64)
        for k in range(n):
            h = (h ^ tok[k : k + m]) * _MIX
            h ^= h >> np.uint64(29)
        keep = np.ones(m, dtype=bool)
        ends = starts[1:][lengths > 0]
        for k in range(1, n):  # windows that run into the next text (all windows of a short text do)
            cut = ends - k
            keep[cut[(cut >= 0) & (cut < m)]] = False
        slots = np.ones(len(out), dtype=bool)
        short = np.flatnonzero((lengths > 0) & (lengths < n))
        slots[offsets[short]] = False
        out[slots] = h[keep]
    # texts with 1..n-1 units: one shingle of all their units
    short = np.flatnonzero((lengths > 0) & (lengths < n))
    if len(short):
        hs = np.zeros(len(short), dtype=np.uint64)
        for k in range(n):
            use = k < lengths[short]
            part = np.where(use, tok[np.minimum(starts[short] + k, len(tok) - 1)], np.uint64(0))
            hs = np.where(use, (hs ^ part) * _MIX, hs)
            hs = np.where(use, hs ^ (hs >> np.uint64(29)), hs)
        out[offsets[short]] = hs
    return Shingles(out, offsets)


def signatures(sh: Shingles, num_perm: int = 128, seed: int = 1, chunk: int = 8192) -> np.ndarray:
    """MinHash signatures, shape ``(n_texts, num_perm)`` uint32, by multiply-shift hashing.

    Texts are processed in groups of about ``chunk`` shingles so that the ``(num_perm, chunk)``
    work buffer stays in cache; texts without shingles keep all 0xFFFFFFFF.
    """
    rng = np.random.default_rng(seed)
    a = (rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    n = len(sh.offsets) - 1
    sig_t = np.full((num_perm, n), 0xFFFFFFFF, dtype=np.uint32)
    nonempty = np.flatnonzero(np.diff(sh.offsets))
    if len(nonempty) == 0:
        return sig_t.T.copy()
    starts = sh.offsets[nonempty]
    cuts = np.unique(np.searchsorted(starts, np.arange(0, sh.offsets[-1], chunk), side="left"))
    cuts = np.append(cuts[cuts < len(nonempty)], len(nonempty))
    groups = list(zip(cuts[:-1], cuts[1:], strict=True))

    def run(block: list) -> None:  # numpy releases the GIL: blocks run on separate cores
        buf = np.empty((num_perm, chunk), dtype=np.uint64)
        for g0, g1 in block:
            lo, hi = starts[g0], sh.offsets[nonempty[g1 - 1] + 1]
            work = buf[:, : hi - lo] if hi - lo <= chunk else np.empty((num_perm, hi - lo), dtype=np.uint64)
            np.multiply(a[:, None], sh.ids[None, lo:hi], out=work)
            work += b[:, None]
            work >>= np.uint64(32)
            sig_t[:, nonempty[g0:g1]] = np.minimum.reduceat(work, starts[g0:g1] - lo, axis=1)

    workers = _workers()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run, [groups[k::workers] for k in range(workers)]))
    return sig_t.T.copy()


@lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int, fn_weight: float = 0.9) -> tuple[int, int]:
    """Bands and rows minimising weighted false-positive + false-negative area (datasketch's rule).

    The default leans to recall because every candidate is verified exactly afterwards.
    """
    s_lo = np.linspace(0, threshold, 200)
    s_hi = np.linspace(threshold, 1, 200)
    best, best_err = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = np.trapezoid(1 - (1 - s_lo**rows) ** bands, s_lo)
            fn = np.trapezoid((1 - s_hi**rows) ** bands, s_hi)
            err = (1 - fn_weight) * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (bands, rows), err
    return best


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``(n, bands)`` uint32 keys; two rows share a key where their band of signature values agrees (a rare
    false agreement of the 32-bit keys only adds a candidate, which the exact check then rejects)."""
    per_band = sig[:, : bands * rows].astype(np.uint64).reshape(sig.shape[0], bands, rows)
    keys = np.zeros((sig.shape[0], bands), dtype=np.uint64)
    for c in range(rows):  # every band at once, one signature column of each at a time
        keys = (keys ^ per_band[:, :, c]) * _MIX
        keys ^= keys >> np.uint64(31)
    return (keys >> np.uint64(32)).astype(np.uint32)


# --- candidates: the one rule of every engine ------------------------------------------------------


@dataclass
class Groups:
    """Rows that share an LSH band key, two or more a group: group ``g`` is ``members[starts[g]:starts[g+1]]``
    (read positions, ascending)."""

    members: np.ndarray  # int64
    starts: np.ndarray  # int64, len = n_groups + 1

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.starts)

    def __len__(self) -> int:
        return len(self.starts) - 1


def lsh_groups(band: np.ndarray, key: np.ndarray, pos: np.ndarray) -> Groups:
    """The candidates of near dedup, in every engine: one ``(band, key, position)`` row per row and band, and
    every set of rows sharing a key in a band, whatever its size, is a group whose members are all compared."""
    order = np.lexsort((pos, key, band))
    b, k, p = band[order], key[order], np.asarray(pos, dtype=np.int64)[order]
    new = np.ones(len(b), dtype=bool)
    new[1:] = (b[1:] != b[:-1]) | (k[1:] != k[:-1])
    starts = np.flatnonzero(new)
    sizes = np.diff(np.append(starts, len(b)))
    keep = sizes >= 2
    members = p[np.repeat(keep, sizes)]
    return Groups(members, np.concatenate(([0], np.cumsum(sizes[keep]))).astype(np.int64))


# --- matches within groups, and the one decision -------------------------------------------------

SMALL_GROUP = 64  # groups up to this size are checked pair by pair; larger ones as one matrix product
_PAIRS_AT_ONCE = 1 << 19


class MemorySets:
    """The shingle sets ``group_matches`` checks, all of them in memory (``sh`` in ``index`` order)."""

    def __init__(self, sh: Shingles):
        self.sh, self.sketch = sh, sketches(sh)

    def load(self, at: np.ndarray) -> Shingles:
        return self.sh.take(at)


def group_matches(groups: Groups, index: np.ndarray, sets, query: np.ndarray, threshold: float,
                  best: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair ``(i, j)`` of a group with ``i`` earlier than ``j``, ``j`` a query row and exact Jaccard
    ``>= threshold``, as positions ``(i, j, similarity)``; with ``best``, only each ``j``'s best match.

    ``index`` holds the positions (ascending) whose sets ``sets`` has: ``sets.sketch`` (``jaccard.Sketches`` in
    ``index`` order) and ``sets.load(at)``, the shingle sets of ``index[at]`` (see :class:`MemorySets`); ``query``
    marks the rows that need a decision (rows decided earlier are only compared against). No pair of a group is
    left out, whatever its size: the sketches first set aside every member with no pair that could reach the
    threshold (an upper bound, so none that does), then the rest are checked exactly, a large group as one
    blocked matrix product of its members' shingle sets; only those members' sets are loaded.
    """
    groups = _plausible(groups, np.searchsorted(index, groups.members), sets.sketch, query, threshold)
    need = distinct(np.searchsorted(index, groups.members))
    return _checked(groups, index[need], sets.load(need), query[need], threshold, best)


def _plausible(groups: Groups, loc: np.ndarray, sketch: Sketches, query: np.ndarray, threshold: float) -> Groups:
    """``groups`` without the members that are in no (earlier, later query) pair whose Jaccard bound reaches
    ``threshold`` (groups left with one member dropped)."""
    sizes = groups.sizes
    keep = np.zeros(len(groups.members), dtype=bool)
    pairs = _later_pairs(groups, np.arange(len(groups)), loc, query, count_only=True)
    small = np.flatnonzero((sizes >= 2) & (pairs <= _PAIRS_AT_ONCE))
    for chunk in _by_pairs(small, pairs):
        a, b = _later_pairs(groups, chunk, loc, query)
        ok = jaccard_bound(sketch, loc[a], loc[b]) >= threshold
        keep[a[ok]] = keep[b[ok]] = True
    for g in np.flatnonzero(pairs > _PAIRS_AT_ONCE).tolist():
        lo, hi = groups.starts[g], groups.starts[g + 1]
        keep[lo:hi] = _plausible_members(loc[lo:hi], sketch, query, threshold)
    gid = np.repeat(np.arange(len(groups)), sizes)
    left = np.bincount(gid[keep], minlength=len(groups))
    keep &= (left >= 2)[gid]
    return Groups(groups.members[keep], np.concatenate(([0], np.cumsum(left[left >= 2]))).astype(np.int64))


def _plausible_members(m: np.ndarray, sketch: Sketches, query: np.ndarray, threshold: float,
                       block: int = 512) -> np.ndarray:
    """The members of one large group (``m``: indices into the sketches, ascending) in a pair that could reach
    ``threshold``, by the bound of every (earlier, later query) pair, a block of earlier members at a time."""
    keep = np.zeros(len(m), dtype=bool)
    cols = np.flatnonzero(query[m])
    for lo in range(0, int(cols.max()) if len(cols) else 0, block):
        right = cols[cols > lo]
        rows = np.arange(lo, min(lo + block, len(m)))
        ok = jaccard_bound(sketch, m[rows][:, None], m[right][None, :]) >= threshold
        ok &= rows[:, None] < right[None, :]
        keep[rows] |= ok.any(axis=1)
        keep[right] |= ok.any(axis=0)
    return keep


def _checked(groups: Groups, index: np.ndarray, sh: Shingles, query: np.ndarray, threshold: float,
             best: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``group_matches`` on loaded sets: small groups pair by pair, large ones as matrix products."""
    loc = np.searchsorted(index, groups.members)
    sizes = groups.sizes
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    small = np.flatnonzero((sizes >= 2) & (sizes <= SMALL_GROUP))
    pairs = _later_pairs(groups, small, loc, query, count_only=True)
    for chunk in _by_pairs(np.arange(len(small)), pairs):
        a, b = _later_pairs(groups, small[chunk], loc, query)
        a, b = loc[a], loc[b]
        if len(a):
            uniq = distinct(a * len(index) + b)
            a, b = uniq // len(index), uniq % len(index)
            sim = exact_jaccard(sh, np.stack([a, b], axis=1))
            hit = sim >= threshold
            found.append(_reduced(a[hit], b[hit], sim[hit], best))
    for members, of_group in _large_sets(groups, loc, np.flatnonzero(sizes > SMALL_GROUP)):
        if query[members].any():
            found.append(_reduced(*large_group_matches(members, of_group, sh, query, threshold, best), best))
    if not found:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0)
    a, b, sim = (np.concatenate(x) for x in zip(*found, strict=True))
    a, b, sim = _reduced(a, b, sim, best) if best else _unique_pairs(a, b, sim)
    return index[a], index[b], sim


def best_earlier(i: np.ndarray, j: np.ndarray, sim: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The one near-dedup decision: per later row ``j``, its best earlier match ``i`` (the most similar; of equals,
    the earliest). A row with any match is a near duplicate; its reason names that match. ``(i, j, sim)``,
    sorted by ``j``; matches found apart (batches, bands, partitions) reduce to the same answer."""
    if not len(j):
        return i, j, sim
    order = np.lexsort((i, -sim, j))
    first = np.ones(len(order), dtype=bool)
    first[1:] = j[order][1:] != j[order][:-1]
    pick = order[first]
    return i[pick], j[pick], sim[pick]


def near_reason(source: str, sim: float) -> str:
    return f"near duplicate of {source} (similarity {sim:.2f})"


def _reduced(a, b, sim, best: bool):
    return best_earlier(a, b, sim) if best else (a, b, sim)


def _unique_pairs(a, b, sim):
    _, first = np.unique(np.stack([a, b], axis=1), axis=0, return_index=True)
    return a[first], b[first], sim[first]


def _by_pairs(groups: np.ndarray, pairs: np.ndarray):
    """``groups`` in chunks of about ``_PAIRS_AT_ONCE`` pairs (``pairs``: each group's count)."""
    if not len(groups):
        return
    n = pairs[groups]
    cut = np.searchsorted(np.cumsum(n), np.arange(_PAIRS_AT_ONCE, n.sum() + _PAIRS_AT_ONCE, _PAIRS_AT_ONCE),
                          side="right")
    lo = 0
    for hi in np.unique(np.append(cut, len(groups))).tolist():
        if hi > lo:
            yield groups[lo:hi]
            lo = hi


def _later_pairs(groups: Groups, chosen: np.ndarray, loc: np.ndarray, query: np.ndarray, count_only: bool = False):
    """Every (earlier, later) pair of member slots of the chosen groups whose later member is a query row, as slot
    indices into ``groups.members``; with ``count_only``, the number of such pairs per chosen group."""
    starts, sizes = groups.starts[chosen], groups.sizes[chosen]
    first = np.repeat(starts, sizes)
    rank = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    slot = first + rank
    rank = np.where(query[loc[slot]], rank, 0)  # a member that is no query row is the later side of no pair
    if count_only:
        return np.bincount(np.repeat(np.arange(len(chosen)), sizes), weights=rank, minlength=len(chosen)).astype(
            np.int64)
    b = np.repeat(slot, rank)
    a = np.repeat(first, rank) + np.arange(rank.sum()) - np.repeat(np.cumsum(rank) - rank, rank)
    return a, b


def _large_sets(groups: Groups, loc: np.ndarray, large: np.ndarray):
    """Large groups that share rows, taken together (a bucket of near copies recurs, a little changed, in most
    bands), else one by one: ``(members, of_group)``, ``of_group`` a (member, group) incidence, or None for one
    group. Together means one product over the union, a pair counting only where both rows are in one group."""
    if not len(large):
        return
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    sizes = groups.sizes[large]
    rank = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    mem = loc[np.repeat(groups.starts[large], sizes) + rank]
    gid = np.repeat(np.arange(len(large)), sizes)
    uniq, m_idx = np.unique(mem, return_inverse=True)
    n = len(uniq) + len(large)
    graph = coo_matrix((np.ones(len(mem), dtype=np.int8), (m_idx, len(uniq) + gid)), shape=(n, n))
    label = connected_components(graph, directed=False)[1][len(uniq):]
    for c in distinct(label).tolist():
        gs = np.flatnonzero(label == c)
        sel = np.isin(gid, gs)
        members, inv = np.unique(mem[sel], return_inverse=True)
        if len(gs) > 1 and len(members) ** 2 <= 2 * int((sizes[gs].astype(np.int64) ** 2).sum()):
            yield members, (inv, np.searchsorted(gs, gid[sel]))
        else:
            for g in gs.tolist():
                yield np.sort(mem[gid == g]), None


# --- whole lists of texts ----------------------------------------------------------------------------


def keyed_rows(keys: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(band, key, position)`` rows of an ``(n, bands)`` key array, as ``lsh_groups`` takes them."""
    n, bands = keys.shape
    return (np.tile(np.arange(bands, dtype=np.int64), n), keys.ravel().astype(np.int64),
            np.repeat(np.asarray(pos, dtype=np.int64), bands))


def near_matches(texts: list[str], threshold: float = 0.8, unit: str = "word", ngram: int = 2, num_perm: int = 128,
                 seed: int = 1, best: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Near-duplicate matches among ``texts`` (indices ``(i, j, similarity)``, ``i < j``): each text's best
    earlier match, or with ``best=False`` every pair at or above ``threshold``. Empty texts match nothing."""
    sh = shingle(texts, unit, ngram)
    keys = band_keys(signatures(sh, num_perm, seed), *lsh_params(threshold, num_perm))
    pos = np.flatnonzero(np.diff(sh.offsets) > 0)
    groups = lsh_groups(*keyed_rows(keys[pos], pos))
    index = np.arange(len(texts))
    return group_matches(groups, index, MemorySets(sh), np.ones(len(texts), dtype=bool), threshold, best)


def near_duplicate_pairs(texts: list[str], threshold: float = 0.8, unit: str = "word", ngram: int = 2,
                         num_perm: int = 128, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of texts whose shingle-set Jaccard is ``>= threshold`` (``(m, 2)``, sorted), with that Jaccard."""
    i, j, sim = near_matches(texts, threshold, unit, ngram, num_perm, seed, best=False)
    order = np.lexsort((j, i))
    return np.stack([i[order], j[order]], axis=1).reshape(-1, 2), sim[order]
