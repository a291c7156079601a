"""Small text helpers for generated items: normalisation, near-duplicate and refusal checks."""

from __future__ import annotations

import re
import unicodedata

_PUNCT = re.compile(r"[\W_]+", re.UNICODE)
REFUSAL = re.compile(
    r"\b(i'?m sorry|i am sorry|i cannot|i can'?t|as an ai|i am unable|i'm unable|죄송|할 수 없)", re.IGNORECASE
)


def normalize(text: str) -> str:
    """Case-folded, punctuation-free, single-spaced: for 'is this the same answer' checks."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_PUNCT.sub(" ", text).split())


def char_ngrams(text: str, n: int = 3) -> set[str]:
    t = normalize(text)
    return {t[i : i + n] for i in range(max(1, len(t) - n + 1))}


def jaccard(a: str, b: str, n: int = 3) -> float:
    x, y = char_ngrams(a, n), char_ngrams(b, n)
    return len(x & y) / len(x | y) if x | y else 1.0


def is_refusal(text: str) -> bool:
    return bool(REFUSAL.search(text[:200]))
