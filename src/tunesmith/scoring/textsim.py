"""Cheap reference-based scores for free-form answers: chrF (sacrebleu) and ROUGE-L.

Both are per example in 0-100. ROUGE-L is the F1 of the longest common subsequence of word
tokens (``\\w+`` after lower-casing, so it also works for Korean, which the usual ASCII-only
ROUGE tokenizer would erase).
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
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 ×100 over word tokens."""
    p, r = _tokens(prediction), _tokens(reference)
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 100 * 2 * precision * recall / (precision + recall)
