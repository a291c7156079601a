"""Reference-based graders computed offline: ``string_check`` and every ``text_similarity`` metric.

- fuzzy_match: rapidfuzz ``WRatio`` on lower-cased, punctuation-free text (rapidfuzz's ``default_process``),
  divided by 100 (the form OpenAI's graders guide shows in its python grader example).
- bleu: sacrebleu's sentence BLEU / 100 (exponential smoothing, 13a tokens).
- gleu: NLTK's sentence GLEU (Google BLEU: min of n-gram precision and recall, n = 1..4).
- meteor: NLTK's METEOR with exact and Porter-stem matching. Its third stage, WordNet synonyms, needs the
  WordNet corpus, which is not downloaded: scores can be lower than METEOR with synonyms.
- rouge_1 … rouge_5, rouge_l: F1 of word n-grams / longest common subsequence (``scoring.textsim``).
- cosine: cosine of sentence embeddings from the shipped encoders (all-MiniLM-L6-v2 for mostly Latin text,
  multilingual-e5-small otherwise), not OpenAI's hosted embedding model, so scores differ from OpenAI's.
"""

from __future__ import annotations

from collections.abc import Sequence

from tunesmith.scoring import textsim

METRICS = ("cosine", "fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5",
           "rouge_l")


def string_check(operation: str, text: str, reference: str) -> float:
    """1.0 when the check holds: eq / ne exact, like contains (case-sensitive), ilike contains ignoring case."""
    holds = {"eq": lambda: text == reference, "ne": lambda: text != reference,
             "like": lambda: reference in text, "ilike": lambda: reference.casefold() in text.casefold()}[operation]()
    return 1.0 if holds else 0.0


class _NoSynonyms:
    """Stands in for NLTK's WordNet reader: METEOR's synonym stage finds nothing, so no corpus is needed."""

    @staticmethod
    def synsets(word: str) -> list:
        return []


def similarity(metric: str, text: str, reference: str) -> float:
    """The metric's score in [0, 1] for one pair (cosine: in [-1, 1])."""
    if metric == "cosine":
        return cosine([text], [reference])[0]
    if metric == "fuzzy_match":
        from rapidfuzz import fuzz, utils

        return fuzz.WRatio(text, reference, processor=utils.default_process) / 100
    if metric == "bleu":
        from sacrebleu.metrics import BLEU

        return BLEU(effective_order=True).sentence_score(text, [reference]).score / 100
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        hyp, ref = textsim.tokens(text), textsim.tokens(reference)
        return float(sentence_gleu([ref], hyp)) if hyp and ref else 0.0
    if metric == "meteor":
        from nltk.translate.meteor_score import meteor_score

        hyp, ref = textsim.tokens(text), textsim.tokens(reference)
        return float(meteor_score([ref], hyp, wordnet=_NoSynonyms())) if hyp and ref else 0.0
    if metric == "rouge_l":
        return textsim.rouge_l(text, reference) / 100
    if metric.startswith("rouge_"):
        return textsim.rouge_n(text, reference, int(metric[-1])) / 100
    raise ValueError(f"unknown evaluation_metric {metric!r}")


def cosine(texts: Sequence[str], references: Sequence[str]) -> list[float]:
    """Cosine similarity of each pair, embedded in one batch (one encoder load for the whole batch)."""
    from tunesmith.models.embeddings import embed

    vectors = embed(list(texts) + list(references))
    n = len(texts)
    return [float(vectors[i] @ vectors[n + i]) for i in range(n)]
