"""The ``generation`` task kind: free-form answers, scored by a chrF headline, ROUGE-L and an exact-answer rate.

The module is called ``freeform``, not ``generation``, so that it is not mistaken for the
``tunesmith.generation`` package (the decoding engine); recipes still name the kind ``generation``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tunesmith.config.kinds import register
from tunesmith.kinds.base import TaskKind
from tunesmith.records import Example
from tunesmith.scoring import textsim
from tunesmith.scoring.display import num, pct


def same_text(prediction: str, reference: str) -> bool:
    """Equal after trimming and folding white space and case (free-form answers that are really labels)."""
    return " ".join(prediction.split()).casefold() == " ".join(reference.split()).casefold()


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


@register
class FreeformKind(TaskKind):
    name = "generation"
    headline = "chrf"

    def score(self, parsed: Any, ex: Example) -> float:
        return 0.0 if parsed is None else textsim.chrf(parsed, [ex.target])

    def correct(self, parsed: Any, ex: Example) -> bool:
        return parsed is not None and same_text(parsed, ex.target)

    def metrics(self, parsed: Sequence[Any], examples: Sequence[Example]) -> dict:
        texts = [p or "" for p in parsed]
        gold = [e.target for e in examples]
        pairs = list(zip(texts, gold, strict=True))
        return {
            "n": len(examples),
            "chrf": _mean([textsim.chrf(p, [g]) for p, g in pairs]),
            "rouge_l": _mean([textsim.rouge_l(p, g) for p, g in pairs]),
            "chrf_corpus": textsim.corpus_chrf(texts, gold),
            "exact": _mean([float(same_text(p, g)) for p, g in pairs]),
        }

    def columns(self):
        return [
            ("ROUGE-L", lambda m: num(m.get("rouge_l"), "{:.2f}")),
            ("exact answer", lambda m: pct(m.get("exact"))),
        ]

    def notes(self) -> str:
        return "chrF (sacrebleu) and ROUGE-L (word LCS F1) against the reference answer, ×100."
