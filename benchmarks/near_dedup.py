"""Near-dedup throughput and accuracy: tunesmith's numpy MinHash-LSH vs a pure-Python datasketch pipeline.

Data: short texts built from real BANKING77 messages (three random messages per text, from
``examples/data`` or ``../shared/data/banking77``), plus planted near-duplicates (1-2 word edits,
Jaccard >= 0.8) and planted hard negatives (more edits, Jaccard mostly 0.5-0.8).

Both sides use the same word-bigram shingles, 128 permutations, the same LSH rule (threshold
0.8, false-negative weight 0.9) and the same exact-Jaccard verification of candidates, so the
difference is MinHash + LSH speed. Truth: every pair with exact Jaccard >= 0.8 among the planted
pairs and among all pairs either side reports (verified exactly).

    python benchmarks/near_dedup.py --n 200000
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import time
from pathlib import Path

import numpy as np

from tunesmith.data.dedup.minhash import exact_jaccard, lsh_params, near_duplicate_pairs, shingle

REPO = Path(__file__).resolve().parents[1]
SOURCES = [
    REPO.parent / "shared" / "data" / "banking77" / "banking77_train.csv",
    REPO / "examples" / "data" / "banking77_10intents.csv",
]
WORD = re.compile(r"\w+")


def load_messages() -> list[str]:
    path = next(p for p in SOURCES if p.is_file())
    with open(path, newline="", encoding="utf-8") as fh:
        return [row["text"] for row in csv.DictReader(fh)]


def edit(words: list[str], k: int, vocab: list[str], rng: random.Random) -> list[str]:
    out = list(words)
    for _ in range(k):
        op = rng.random()
        pos = rng.randrange(len(out))
        if op < 0.5:
            out[pos] = rng.choice(vocab)
        elif op < 0.75 and len(out) > 5:
            del out[pos]
        else:
            out.insert(pos, rng.choice(vocab))
    return out


def make_data(n: int, seed: int = 0) -> tuple[list[str], list[tuple[int, int]]]:
    rng = random.Random(seed)
    msgs = load_messages()
    vocab = sorted({w for m in msgs for w in WORD.findall(m.lower())})
    n_dup, n_neg = n // 10, n // 20
    base = [" ".join(rng.sample(msgs, 3)) for _ in range(n - n_dup - n_neg)]
    texts = list(base)
    planted = []
    for k, count in ((rng.choice, n_dup), (None, n_neg)):
        for _ in range(count):
            i = rng.randrange(len(base))
            words = base[i].split()
            edits = rng.choice((1, 1, 2)) if k else rng.choice((4, 5, 6, 8))
            texts.append(" ".join(edit(words, edits, vocab, rng)))
            planted.append((i, len(texts) - 1))
    order = list(range(len(texts)))
    rng.shuffle(order)
    where = {old: new for new, old in enumerate(order)}
    texts = [texts[i] for i in order]
    planted = [tuple(sorted((where[a], where[b]))) for a, b in planted]
    return texts, planted


def bigrams(text: str) -> list[bytes]:
    w = WORD.findall(text.lower())
    if len(w) < 2:
        return [" ".join(w).encode()] if w else []
    return [f"{a} {b}".encode() for a, b in zip(w, w[1:], strict=False)]


def datasketch_pairs(texts: list[str], threshold: float, num_perm: int) -> np.ndarray:
    from datasketch import MinHash, MinHashLSH

    bands, rows = lsh_params(threshold, num_perm)
    lsh = MinHashLSH(num_perm=num_perm, params=(bands, rows))
    sigs = []
    for i, t in enumerate(texts):
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch(bigrams(t))
        sigs.append(m)
        lsh.insert(i, m)
    pairs = set()
    for i, m in enumerate(sigs):
        for j in lsh.query(m):
            if j != i:
                pairs.add((min(i, j), max(i, j)))
    return np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)


def score(found: set, truth: set, jac: dict) -> tuple[float, float]:
    good = {p for p in found if jac[p] >= 0.8}
    recall = len(found & truth) / len(truth) if truth else 1.0
    precision = len(good) / len(found) if found else 1.0
    return recall, precision


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--num-perm", type=int, default=128)
    args = ap.parse_args()

    texts, planted = make_data(args.n)
    print(
        f"{len(texts):,} texts, {len(planted):,} planted pairs, "
        f"mean {np.mean([len(t.split()) for t in texts]):.1f} words"
    )

    t0 = time.perf_counter()
    ours, _ = near_duplicate_pairs(texts, args.threshold, "word", 2, args.num_perm)
    t_ours = time.perf_counter() - t0
    print(f"tunesmith : {t_ours:7.2f} s  {len(texts) / t_ours:10,.0f} docs/s  {len(ours):,} pairs")

    t0 = time.perf_counter()
    cand = datasketch_pairs(texts, args.threshold, args.num_perm)
    sh = shingle(texts, "word", 2)
    jac_ds = exact_jaccard(sh, cand)
    theirs = cand[jac_ds >= args.threshold]
    t_ds = time.perf_counter() - t0
    print(
        f"datasketch: {t_ds:7.2f} s  {len(texts) / t_ds:10,.0f} docs/s  {len(theirs):,} pairs "
        f"({len(cand):,} LSH candidates)"
    )

    found_ours = {tuple(p) for p in ours.tolist()}
    found_ds = {tuple(p) for p in theirs.tolist()}
    every = sorted(set(planted) | found_ours | found_ds)
    jac = dict(zip(every, exact_jaccard(sh, np.array(every, dtype=np.int64)).tolist(), strict=True))
    truth = {p for p in every if jac[p] >= args.threshold}
    print(
        f"truth: {len(truth):,} pairs with Jaccard >= {args.threshold} "
        f"({sum(jac[p] >= args.threshold for p in planted):,} planted)"
    )
    r1, p1 = score(found_ours, truth, jac)
    r2, p2 = score(found_ds, truth, jac)
    print(f"tunesmith : recall {r1:.4f}  precision {p1:.4f}")
    print(f"datasketch: recall {r2:.4f}  precision {p2:.4f}")
    print(f"speed-up (datasketch time / tunesmith time): {t_ds / t_ours:.1f}x")


if __name__ == "__main__":
    main()
