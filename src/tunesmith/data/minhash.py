"""Near-duplicate detection with MinHash + LSH banding, vectorised with numpy.

Pipeline: shingles (word or char n-grams) → 64-bit ids → ``num_perm`` MinHash values per text
(multiply-shift hashing, one ``np.minimum.reduceat`` per chunk) → LSH bands bucketed by sorting
→ candidate pairs → exact Jaccard on the shingle sets, so that reported pairs are true pairs.
Only the shingling touches Python per text; everything after it runs on arrays.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

_WORD_SPLIT = r"[^\p{L}\p{N}\p{M}_]+"
_MASK32 = np.uint64(0xFFFFFFFF)
_MIX = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class Shingles:
    """All texts' shingle ids in one flat array; text ``i`` owns ``ids[offsets[i]:offsets[i+1]]``."""

    ids: np.ndarray  # uint64
    offsets: np.ndarray  # int64, len = n_texts + 1

    def of(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]


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


def candidate_pairs(sig: np.ndarray, bands: int, rows: int, max_bucket: int = 64) -> np.ndarray:
    """Pairs ``(i, j)``, ``i < j``, that share at least one band. Shape ``(m, 2)`` int64.

    Buckets bigger than ``max_bucket`` link each member to the bucket's first one only (enough
    to keep clusters connected; avoids quadratic blow-up on degenerate texts).
    """
    n = sig.shape[0]

    def band_pairs(band: int) -> list[np.ndarray]:
        found = []
        cols = sig[:, band * rows : (band + 1) * rows].astype(np.uint64)
        key = np.zeros(n, dtype=np.uint64)
        for c in range(cols.shape[1]):
            key = (key ^ cols[:, c]) * _MIX
            key ^= key >> np.uint64(31)
        order = np.argsort(key)
        sk = key[order]
        same = sk[1:] == sk[:-1]
        if not same.any():
            return found
        # runs of equal keys: their starts and lengths
        boundaries = np.flatnonzero(np.concatenate(([True], ~same, [True])))
        starts, lengths = boundaries[:-1], np.diff(boundaries)
        s2 = starts[lengths == 2]
        found.append(np.stack([order[s2], order[s2 + 1]], axis=1))
        for s, length in zip(starts[lengths > 2], lengths[lengths > 2], strict=True):
            members = np.sort(order[s : s + length])
            if length <= max_bucket:
                ii, jj = np.triu_indices(length, k=1)
                found.append(np.stack([members[ii], members[jj]], axis=1))
            else:
                found.append(np.stack([np.full(length - 1, members[0]), members[1:]], axis=1))
        return found

    with ThreadPoolExecutor(_workers()) as pool:  # bands are independent; numpy releases the GIL
        out = [p for found in pool.map(band_pairs, range(bands)) for p in found]
    if not out:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.concatenate(out)
    pairs = np.sort(pairs, axis=1)
    keys = np.unique(pairs[:, 0] * n + pairs[:, 1])
    return np.stack([keys // n, keys % n], axis=1)


_LOW40 = np.uint64((1 << 40) - 1)


def _packed(group: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``group`` (< 2**24) in the high 24 bits, the top 40 bits of ``h`` below: one sortable uint64."""
    return (group.astype(np.uint64) << np.uint64(40)) | (h >> np.uint64(24))


def exact_jaccard(sh: Shingles, pairs: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """Jaccard similarity of the shingle sets of each pair, on arrays.

    Each text's shingles are made unique, then both sides of every pair are packed with the
    pair's index into one uint64 and sorted: an adjacent equal value is one shared shingle.
    Shingles are compared on 40 bits, which can merge two in a text about once in 10^9 pairs.
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if len(pairs) > chunk:
        parts = [exact_jaccard(sh, pairs[lo : lo + chunk]) for lo in range(0, len(pairs), chunk)]
        return np.concatenate(parts)
    if len(pairs) == 0:
        return np.empty(0, dtype=np.float64)
    docs = np.unique(pairs)
    counts = np.diff(sh.offsets)[docs]
    idx = np.repeat(sh.offsets[docs] - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
    key = np.sort(_packed(np.repeat(np.arange(len(docs)), counts), sh.ids[idx]))
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    key = key[first]  # unique shingles per text, grouped by text
    vals = key & _LOW40
    starts = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(np.bincount((key >> np.uint64(40)).astype(np.int64), minlength=len(docs)), out=starts[1:])
    size = np.diff(starts)
    pos = np.searchsorted(docs, pairs)
    side = pos.ravel()
    n_each = size[side]
    tag = np.repeat(np.repeat(np.arange(len(pairs)), 2), n_each)
    gather = np.repeat(starts[side] - np.cumsum(n_each) + n_each, n_each) + np.arange(n_each.sum())
    both = np.sort((tag.astype(np.uint64) << np.uint64(40)) | vals[gather])
    shared = both[1:][both[1:] == both[:-1]]
    inter = np.bincount((shared >> np.uint64(40)).astype(np.int64), minlength=len(pairs))
    union = size[pos[:, 0]] + size[pos[:, 1]] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def near_duplicate_pairs(
    texts: list[str],
    threshold: float = 0.8,
    unit: str = "word",
    ngram: int = 2,
    num_perm: int = 128,
    seed: int = 1,
    prefilter_margin: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of texts whose shingle-set Jaccard is ``>= threshold``, with that Jaccard.

    Candidates from LSH are first screened by their signature agreement (vectorised; a margin
    below the threshold keeps recall) and then verified exactly.
    """
    sh = shingle(texts, unit, ngram)
    sig = signatures(sh, num_perm, seed)
    bands, rows = lsh_params(threshold, num_perm)
    pairs = candidate_pairs(sig, bands, rows)
    empty = np.diff(sh.offsets) == 0
    if len(pairs):
        pairs = pairs[~(empty[pairs[:, 0]] | empty[pairs[:, 1]])]
    if len(pairs):
        est = np.empty(len(pairs))
        for lo in range(0, len(pairs), 100_000):
            p = pairs[lo : lo + 100_000]
            est[lo : lo + 100_000] = (sig[p[:, 0]] == sig[p[:, 1]]).mean(axis=1)
        pairs = pairs[est >= threshold - prefilter_margin]
    jac = exact_jaccard(sh, pairs)
    keep = jac >= threshold
    return pairs[keep], jac[keep]


def clusters(n: int, pairs: np.ndarray) -> np.ndarray:
    """Union-find over pairs; returns each item's cluster root (the smallest index in it)."""
    parent = np.arange(n)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs.tolist():
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return np.array([find(i) for i in range(n)])


def earlier_roots(n: int, pairs: np.ndarray) -> np.ndarray:
    """Per item, the first item of its chain of earlier duplicates: itself when no earlier item is paired
    with it, else the smallest such root among its earlier partners. Unlike ``clusters``, an item is never
    joined to an earlier one through a later item, so a stream can decide each item when it arrives."""
    root = np.arange(n)
    if len(pairs):
        pairs = pairs[np.lexsort((pairs[:, 0], pairs[:, 1]))]  # by the later item, then the earlier
        for i, j in pairs.tolist():
            root[j] = min(root[j], root[i])
    return root
