"""Cheap reference-based scores for free-form answers: chrF (sacrebleu), ROUGE-N and ROUGE-L.

All are per example in 0-100. ROUGE-N is the F1 of clipped word n-gram overlap; ROUGE-L is the F1
of the longest common subsequence. Both use word tokens (``\\w+`` after lower-casing, so they also work
for Korean, which the usual ASCII-only ROUGE tokenizer would erase).
"""

from __future__ import annotations

import re
from collections.abc import Sequence


def chrf(prediction: str, references: Sequence[str]) -> float:
    """Sentence-level chrF (character 6-grams, beta 2) as sacrebleu computes it."""
    from sacrebleu.metrics import CHRF

    return float(CHRF().sentence_score(prediction, list(references)).score)


def corpus_chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    from sacrebleu.metrics import CHRF

    return float(CHRF().corpus_score(list(predictions), [list(references)]).score)


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _lcs(a: list[str], b: list[str]) -> int:
    """The length of the longest common subsequence of two word lists: rapidfuzz's bit-parallel LCS in C (two
    10,000-word texts in milliseconds, where a Python dynamic programme took minutes and held the GIL)."""
    from rapidfuzz.distance import LCSseq

    return int(LCSseq.similarity(a, b))


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 ×100 over word tokens."""
    p, r = _tokens(prediction), _tokens(reference)
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 100 * 2 * precision * recall / (precision + recall)


def _ngrams(tokens: list[str], n: int) -> dict[tuple[str, ...], int]:
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i : i + n])
        counts[gram] = counts.get(gram, 0) + 1
    return counts


def rouge_n(prediction: str, reference: str, n: int) -> float:
    """ROUGE-N F1 ×100: clipped overlap of word n-grams (same tokens as :func:`rouge_l`)."""
    p, r = _ngrams(_tokens(prediction), n), _ngrams(_tokens(reference), n)
    overlap = sum(min(c, r.get(g, 0)) for g, c in p.items())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(p.values()), overlap / sum(r.values())
    return 100 * 2 * precision * recall / (precision + recall)


def tokens(text: str) -> list[str]:
    """The word tokens every score here compares (lower-cased ``\\w+``, so Korean keeps its words)."""
    return _tokens(text)
