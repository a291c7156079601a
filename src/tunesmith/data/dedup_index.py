"""Dedup state for the streaming data stage: what each dedup step keeps between batches.

Exact dedup keeps an 8-byte hash and a 4-byte position per distinct row; near dedup keeps, per LSH band,
a 4-byte band key and a 4-byte position per row, and writes each row's shingle set and ``file:line`` to
files on disk (read back only for the candidates a new batch brings). Rows are numbered by the order in
which they reach the step, so "the first" and "earlier" mean the same as in the in-memory steps.
"""

from __future__ import annotations

import hashlib
import os
import re
from array import array
from pathlib import Path

import numpy as np

from tunesmith.data.minhash import Shingles, exact_jaccard, lsh_params, shingle, signatures
from tunesmith.records import Record, Rejected

_SPACES = re.compile(r"\s+")
_MIX = np.uint64(0x9E3779B97F4A7C15)


class SpillLog:
    """Variable-size byte records appended to a file; record ``i`` is read back with one ``pread``."""

    def __init__(self, path: Path):
        self.fh = open(path, "ab+")  # noqa: SIM115 - closed by close()
        self.offsets = array("q", [0])

    def extend(self, items: list[bytes]) -> None:
        self.fh.write(b"".join(items))
        for item in items:
            self.offsets.append(self.offsets[-1] + len(item))

    def get(self, i: int) -> bytes:
        self.fh.flush()
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return os.pread(self.fh.fileno(), hi - lo, lo)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def close(self) -> None:
        self.fh.close()


class SortedRuns:
    """A multimap of uint keys to row positions as a few sorted arrays (merged when they pile up)."""

    def __init__(self, dtype=np.uint64, max_runs: int = 8):
        self.dtype, self.max_runs = dtype, max_runs
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, keys: np.ndarray, pos: np.ndarray) -> None:
        if not len(keys):
            return
        order = np.lexsort((pos, keys))
        self.runs.append((keys[order].astype(self.dtype), pos[order].astype(np.uint32)))
        if len(self.runs) > self.max_runs:
            keys = np.concatenate([k for k, _ in self.runs])
            pos = np.concatenate([p for _, p in self.runs])
            order = np.lexsort((pos, keys))
            self.runs = [(keys[order], pos[order])]

    def first(self, keys: np.ndarray) -> np.ndarray:
        """The smallest position stored under each key, or -1."""
        out = np.full(len(keys), -1, dtype=np.int64)
        keys = keys.astype(self.dtype)
        for k, p in self.runs:
            at = np.searchsorted(k, keys)
            hit = (at < len(k)) & (k[np.minimum(at, len(k) - 1)] == keys)
            found = np.where(hit, p[np.minimum(at, len(k) - 1)].astype(np.int64), -1)
            out = np.where((out < 0) | ((found >= 0) & (found < out)), np.where(found >= 0, found, out), out)
        return out

    def members(self, keys: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
        """``(query, position)`` pairs: up to ``cap`` of the smallest positions per key in each run."""
        keys = keys.astype(self.dtype)
        qs, ps = [], []
        for k, p in self.runs:
            lo, hi = np.searchsorted(k, keys, "left"), np.searchsorted(k, keys, "right")
            n = np.minimum(hi - lo, cap)
            q = np.repeat(np.arange(len(keys)), n)
            idx = np.repeat(lo - np.cumsum(n) + n, n) + np.arange(n.sum())
            qs.append(q)
            ps.append(p[idx].astype(np.int64))
        if not qs:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate(qs), np.concatenate(ps)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + p.nbytes for k, p in self.runs)


def text_hash(texts: list[str]) -> np.ndarray:
    """A 64-bit hash per text (blake2b); two texts share one about once in 10^19 pairs."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
         for t in texts], dtype=np.uint64,
    ).reshape(-1)


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``(n, bands)`` uint32 keys; two rows share a key where their band of signature values agrees
    (a rare false agreement only adds a candidate, which the exact check then rejects)."""
    keys = np.zeros((sig.shape[0], bands), dtype=np.uint64)
    for b in range(bands):
        for c in range(b * rows, (b + 1) * rows):
            keys[:, b] = (keys[:, b] ^ sig[:, c].astype(np.uint64)) * _MIX
            keys[:, b] ^= keys[:, b] >> np.uint64(31)
    return (keys >> np.uint64(32)).astype(np.uint32)


def normalized_keys(records: list[Record], spec) -> list[str]:
    """The text ``exact_dedup`` compares: the step's fields joined, lower-cased and whitespace-collapsed
    when ``normalize`` is on."""
    keys = [field_text(r, spec.fields) for r in records]
    return [_SPACES.sub(" ", k.lower()).strip() for k in keys] if spec.normalize else keys


def pair_jaccard(arrays: list[np.ndarray], local: np.ndarray) -> np.ndarray:
    """Exact Jaccard of each ``(i, j)`` pair of indices into ``arrays`` (sorted shingle sets)."""
    offsets = np.concatenate(([0], np.cumsum([len(a) for a in arrays]))).astype(np.int64)
    return exact_jaccard(Shingles(np.concatenate(arrays), offsets), local, chunk=1 << 16)


def field_text(rec: Record, fields: list[str]) -> str:
    return "\n".join("" if rec.data.get(f) is None else str(rec.data[f]) for f in fields)


class ExactIndex:
    """``exact_dedup`` over batches: a row is dropped when its (normalised) text hashes like an earlier one."""

    def __init__(self, spec, workdir: Path):
        self.spec = spec
        self.hashes = SortedRuns()
        self.sources = SpillLog(workdir / "exact_sources.bin")

    def __call__(self, records: list[Record], spec, ctx) -> tuple[list[Record], list[Rejected]]:
        h = text_hash(normalized_keys(records, spec))
        earlier = self.hashes.first(h)
        _, first_in_batch = np.unique(h, return_index=True)
        new = np.zeros(len(h), dtype=bool)
        new[first_in_batch] = True
        new &= earlier < 0
        base = len(self.sources)
        fresh = np.flatnonzero(new)
        self.hashes.add(h[fresh], base + np.arange(len(fresh)))
        self.sources.extend([(records[i].source + "\n").encode("utf-8", "surrogatepass") for i in fresh])
        first = self.hashes.first(h)
        kept, dropped = [], []
        for i, rec in enumerate(records):
            if new[i]:
                kept.append(rec)
            else:
                src = self.sources.get(int(first[i])).decode("utf-8", "surrogatepass").rstrip("\n")
                dropped.append(Rejected(rec.source, "", f"exact duplicate of {src}", rec.data))
        return kept, dropped

    def close(self) -> None:
        self.sources.close()


class NearIndex:
    """``near_dedup`` over batches: MinHash signatures of each batch, LSH band keys kept for every row seen,
    candidates verified on exact shingle Jaccard against the earlier rows' shingle sets read back from disk.

    A row is dropped when it is a near duplicate (Jaccard >= threshold) of any earlier row; the reason names
    the first row of that chain, as the in-memory step names its cluster's first row.
    """

    max_bucket = 64

    def __init__(self, spec, workdir: Path):
        self.spec = spec
        self.bands, self.rows = lsh_params(spec.threshold, spec.num_perm)
        self.index = [SortedRuns(np.uint32) for _ in range(self.bands)]
        self.shingles = SpillLog(workdir / "near_shingles.bin")
        self.sources = SpillLog(workdir / "near_sources.bin")
        self.root = array("i")

    def band_keys(self, sig: np.ndarray) -> np.ndarray:
        return band_keys(sig, self.bands, self.rows)

    def __call__(self, records: list[Record], spec, ctx) -> tuple[list[Record], list[Rejected]]:
        sh = shingle([field_text(r, spec.fields) for r in records], spec.unit, spec.ngram)
        sets = [sh.of(i) for i in range(len(records))]
        sig = signatures(sh, spec.num_perm, spec.seed)
        base = len(self.shingles)
        pos = base + np.arange(len(records))
        nonempty = np.array([len(s) > 0 for s in sets], dtype=bool)
        keys = self.band_keys(sig)
        for b, runs in enumerate(self.index):
            runs.add(keys[nonempty, b], pos[nonempty])
        self.shingles.extend([s.tobytes() for s in sets])
        self.sources.extend([(r.source + "\n").encode("utf-8", "surrogatepass") for r in records])
        pairs = self._candidates(keys[nonempty], pos[nonempty])
        sim = self._jaccard(pairs, sets, base)
        good = sim >= spec.threshold
        return self._decide(records, pairs[good], sim[good], base)

    def _candidates(self, keys: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """``(earlier, row)`` pairs sharing a band key, earlier < row, unique."""
        found = []
        for b, runs in enumerate(self.index):
            q, p = runs.members(keys[:, b], self.max_bucket)
            mine = pos[q]
            keep = p < mine
            found.append(np.stack([p[keep], mine[keep]], axis=1))
        pairs = np.concatenate(found) if found else np.empty((0, 2), np.int64)
        return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)

    def _jaccard(self, pairs: np.ndarray, sets: list[np.ndarray], base: int) -> np.ndarray:
        """Exact Jaccard of each pair's shingle sets: this batch's from memory, earlier rows' from disk."""
        if not len(pairs):
            return np.empty(0)
        docs = np.unique(pairs)
        arrays = [sets[d - base] if d >= base else np.frombuffer(self.shingles.get(int(d)), dtype=np.uint64)
                  for d in docs.tolist()]
        return pair_jaccard(arrays, np.searchsorted(docs, pairs))

    def _decide(self, records: list[Record], pairs: np.ndarray, sim: np.ndarray, base: int):
        """Keep rows without an earlier match; a dropped row's root is the smallest root among its matches."""
        matches: dict[int, list[int]] = {}
        score: dict[int, float] = {}
        for (j, i), s in zip(pairs.tolist(), sim.tolist(), strict=True):
            matches.setdefault(i, []).append(j)
            score[i] = max(score.get(i, 0.0), s)
        kept, dropped = [], []
        for k, rec in enumerate(records):
            i = base + k
            if i not in matches:
                self.root.append(i)
                kept.append(rec)
                continue
            root = min(self.root[j] for j in matches[i])
            self.root.append(root)
            src = self.sources.get(root).decode("utf-8", "surrogatepass").rstrip("\n")
            dropped.append(Rejected(rec.source, "", f"near duplicate of {src} (similarity {score[i]:.2f})", rec.data))
        return kept, dropped

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.index) + 8 * (len(self.shingles) + len(self.sources)) + 4 * len(self.root)

    def close(self) -> None:
        self.shingles.close()
        self.sources.close()
