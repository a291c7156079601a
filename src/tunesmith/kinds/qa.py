"""Extractive QA: exact match and F1 with SQuAD v1.1 (en) or KorQuAD v1.0 (ko) normalisation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tunesmith.config.kinds import TargetError, register
from tunesmith.kinds.base import TaskKind
from tunesmith.records import Example
from tunesmith.scoring import qa
from tunesmith.scoring.display import num


@register
class QA(TaskKind):
    name = "qa"
    headline = "f1"

    def read_target(self, value: Any, record: dict) -> tuple[str, dict]:
        """A list of gold answers (SQuAD's ``answers``) or one answer; all of them are kept for scoring."""
        answers = [str(a).strip() for a in value] if isinstance(value, list) else [str(value).strip()]
        answers = [a for a in answers if a]
        if not answers:
            raise TargetError("no gold answer")
        starts = record.get("answer_starts") if isinstance(record, dict) else None
        meta = {"answers": answers}
        if isinstance(starts, list) and starts and isinstance(starts[0], int):
            meta["answer_start"] = starts[0]  # where the first answer sits in the context (for head: span)
        return answers[0], meta

    def parse(self, output: str | None) -> Any:
        return None if output is None else qa.parse_answer(output)

    def gold(self, ex: Example) -> list[str]:
        return ex.meta.get("answers") or [ex.target]

    def score(self, parsed: Any, ex: Example) -> float:
        if parsed is None:
            return 0.0
        return 100.0 * qa.best_over(lambda p, t: qa.f1(p, t, self.cfg.qa_lang), parsed, self.gold(ex))

    def correct(self, parsed: Any, ex: Example) -> bool:
        return parsed is not None and any(qa.exact_match(parsed, t, self.cfg.qa_lang) for t in self.gold(ex))

    def metrics(self, parsed: Sequence[Any], examples: Sequence[Example]) -> dict:
        preds = {e.id: p for e, p in zip(examples, parsed, strict=True) if p is not None}
        s = qa.score_qa({e.id: self.gold(e) for e in examples}, preds, self.cfg.qa_lang)
        return {"n": s.total, "exact_match": s.exact_match, "f1": s.f1, "unanswered": len(s.missing)}

    def columns(self):
        return [
            ("exact match", lambda m: num(m.get("exact_match"), "{:.2f}")),
            ("unanswered", lambda m: str(m.get("unanswered", "–"))),
        ]

    def notes(self) -> str:
        rule = "KorQuAD v1.0 (character F1)" if self.cfg.qa_lang == "ko" else "SQuAD v1.1 (word F1)"
        return f"Exact match and F1 ×100 with {rule} normalisation, best over the gold answers."
