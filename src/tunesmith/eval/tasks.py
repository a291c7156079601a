"""What a task's answers are and how they are scored: one parser and one scorer per task kind,
shared by every contender (local model, endpoint, baseline) so the comparison is fair.

Each contender ends as a ``ContenderResult`` whose ``per_example`` holds the headline metric per
example (correct 0/1, absolute error, F1, chrF), which is what the bootstrap resamples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunesmith.config import EvalSection
from tunesmith.errors import DataError
from tunesmith.eval import metrics as M
from tunesmith.eval import qa, textsim
from tunesmith.eval.classify import ContenderResult
from tunesmith.records import Example

HEADLINE = {  # task kind → (headline metric, higher is better)
    "classification": ("accuracy", True),
    "regression": ("mae", False),
    "qa": ("f1", True),
    "generation": ("chrf", True),
}


@dataclass
class Task:
    kind: str
    labels: list[str]
    cfg: EvalSection

    @property
    def headline(self) -> str:
        return HEADLINE[self.kind][0]

    @property
    def higher_is_better(self) -> bool:
        return HEADLINE[self.kind][1]

    def parse(self, output: str | None) -> Any:
        """The strict parse of one raw output; ``None`` means unparseable (or no output at all)."""
        if output is None:
            return None
        if self.kind == "classification":
            return M.parse_label(output, self.labels)
        if self.kind == "regression":
            return M.parse_number(output)
        if self.kind == "qa":
            return qa.parse_answer(output)
        return output.strip()

    def gold(self, ex: Example) -> Any:
        if self.kind == "regression":
            value = M.parse_number(ex.target)
            if value is None:
                raise DataError(
                    f"example {ex.id}: the target {ex.target!r} is not a number (regression task)"
                )
            return value
        if self.kind == "qa":
            return ex.meta.get("answers") or [ex.target]
        return ex.target

    def score(self, parsed: Any, ex: Example) -> float | None:
        """Headline metric for one example (None where it does not exist, e.g. no number to compare)."""
        g = self.gold(ex)
        if self.kind == "classification":
            return float(parsed == g)
        if self.kind == "regression":
            return None if parsed is None else abs(parsed - g)
        if self.kind == "qa":
            return (
                0.0
                if parsed is None
                else 100.0 * qa.best_over(lambda p, t: qa.f1(p, t, self.cfg.qa_lang), parsed, g)
            )
        return 0.0 if parsed is None else textsim.chrf(parsed, [g])

    def correct(self, parsed: Any, ex: Example) -> bool | None:
        g = self.gold(ex)
        if self.kind == "classification":
            return parsed == g
        if self.kind == "regression":
            return M.band(parsed, g, self.cfg.bands) == "green"
        if self.kind == "qa":
            return parsed is not None and any(qa.exact_match(parsed, t, self.cfg.qa_lang) for t in g)
        return parsed is not None and _same_text(parsed, g)

    def metrics(self, parsed: Sequence[Any], examples: Sequence[Example]) -> dict:
        gold = [self.gold(e) for e in examples]
        if self.kind == "classification":
            out = M.classification_metrics(gold, parsed, self.labels)
            out["per_class"] = M.per_class(gold, parsed, self.labels)
            if M.is_ordinal(self.labels):
                out |= M.ordinal_metrics(gold, parsed)
            return out
        if self.kind == "regression":
            return M.regression_metrics(gold, parsed, self.cfg.bands)
        if self.kind == "qa":
            preds = {e.id: p for e, p in zip(examples, parsed, strict=True) if p is not None}
            s = qa.score_qa({e.id: g for e, g in zip(examples, gold, strict=True)}, preds, self.cfg.qa_lang)
            return {"n": s.total, "exact_match": s.exact_match, "f1": s.f1, "unanswered": len(s.missing)}
        texts = [p or "" for p in parsed]
        return {
            "n": len(examples),
            "chrf": _mean([textsim.chrf(p, [g]) for p, g in zip(texts, gold, strict=True)]),
            "rouge_l": _mean([textsim.rouge_l(p, g) for p, g in zip(texts, gold, strict=True)]),
            "chrf_corpus": textsim.corpus_chrf(texts, gold),
            "exact": _mean([float(_same_text(p, g)) for p, g in zip(texts, gold, strict=True)]),
        }


def _same_text(prediction: str, reference: str) -> bool:
    """Equal after trimming and folding white space and case (free-form answers that are really labels)."""
    return " ".join(prediction.split()).casefold() == " ".join(reference.split()).casefold()


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def score_outputs(
    task: Task,
    name: str,
    description: str,
    kind: str,
    examples: Sequence[Example],
    prompts: Sequence[str],
    outputs: Sequence[str | None],
    errors: Sequence[str | None] | None = None,
) -> ContenderResult:
    """Parse and score raw outputs; ``errors`` (endpoint failures) are reported per example."""
    errors = list(errors) if errors is not None else [None] * len(outputs)
    parsed = [task.parse(o) for o in outputs]
    metrics = task.metrics(parsed, examples)
    metrics["scoring"] = "direct prediction" if kind == "baseline" else "free generation"
    if kind == "endpoint":
        metrics["failed_calls"] = sum(e is not None for e in errors)
    rows = [
        {
            "model": name,
            "id": ex.id,
            "prompt": p,
            "output": o,
            "parsed": pa,
            "gold": task.gold(ex),
            "correct": task.correct(pa, ex),
            **({"error": err} if err else {}),
        }
        for ex, p, o, pa, err in zip(examples, prompts, outputs, parsed, errors, strict=True)
    ]
    per = [task.score(pa, ex) for pa, ex in zip(parsed, examples, strict=True)]
    return ContenderResult(name, description, metrics, rows, list(parsed), per, kind)
