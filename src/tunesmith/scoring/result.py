"""What one contender's evaluation produced: metrics, per-example rows and the per-example
headline values the bootstrap resamples."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path


class Source(StrEnum):
    """Where a contender's answers come from."""

    LOCAL = "llm"  # a model run here: the base model, a trained arm, an eval.adapters folder, a head
    ENDPOINT = "endpoint"  # an OpenAI-compatible server
    BASELINE = "baseline"  # an LLM-free predictor of the task kind


@dataclass
class ContenderResult:
    name: str
    description: str
    metrics: dict
    predictions: list[dict] = field(default_factory=list)
    headline: list = field(default_factory=list)  # the parsed predictions behind the headline metric
    per_example: list[float | None] = field(default_factory=list)  # headline metric per example (bootstrap)
    source: Source = Source.LOCAL

    @property
    def is_local(self) -> bool:
        return self.source is Source.LOCAL

    @property
    def is_endpoint(self) -> bool:
        return self.source is Source.ENDPOINT

    @property
    def is_baseline(self) -> bool:
        return self.source is Source.BASELINE

    @property
    def is_fine_tuned(self) -> bool:
        """A model of ours that was trained (an arm or an eval.adapters folder), not the base model."""
        return self.is_local and self.name != "base"

    @property
    def kind(self) -> str:
        """What the contender is, as metrics.json records it: base, fine-tuned, baseline or endpoint."""
        if self.is_baseline:
            return "baseline"
        if self.is_endpoint:
            return "endpoint"
        return "base" if self.name == "base" else "fine-tuned"


def contender_kind(name: str, metrics: dict) -> str:
    """base, fine-tuned, baseline or endpoint for one contender of a metrics.json: the ``contender`` entry the
    evaluation writes, or, in a metrics.json from before it, the same rule read from what a baseline and an
    endpoint leave there (a baseline's ``direct prediction`` scoring, an endpoint's ``failed_calls``)."""
    if metrics.get("contender"):
        return metrics["contender"]
    if metrics.get("scoring") == "direct prediction":
        return "baseline"
    if "failed_calls" in metrics:
        return "endpoint"
    return "base" if name == "base" else "fine-tuned"


def best_contender(task, metrics: dict[str, dict], names) -> str | None:
    """Of ``names``, the contender with the best value of the task's headline metric (the first on a tie);
    None when none has one. ``metrics``: contender name → its metrics."""
    top = None
    for name in names:
        v = metrics[name].get(task.headline)
        if v is not None and (top is None or (v > metrics[top][task.headline] if task.higher_is_better
                                              else v < metrics[top][task.headline])):
            top = name
    return top


def baseline_comparison(comparisons: list[dict], arm: str | None, baseline: str | None) -> dict | None:
    """The paired comparison of ``arm`` against ``baseline`` (the best one), from comparisons.json; None without."""
    if arm is None or baseline is None:
        return None
    return next((c for c in comparisons if c.get("a") == arm and c.get("b") == baseline), None)


@dataclass
class EvalRun:
    """What one evaluation wrote: the eval folder, its task kind, every contender's result and the reports."""

    eval_dir: Path
    task: object  # tunesmith.kinds.TaskKind
    results: list[ContenderResult]
    report_md: Path
    report_html: Path
    summary: dict = field(default_factory=dict)
    report: object = None  # the eval report (tunesmith.eval.report.Report), re-rendered into the run's report.md


def save_result(path: Path, key: str, result: ContenderResult) -> None:
    """Write one contender's result with the ``key`` it was computed under (see :func:`load_result`). Written to a
    temporary file and renamed, so a kill mid-write leaves no half file behind."""
    import json

    doc = {"key": key, "name": result.name, "description": result.description, "metrics": result.metrics,
           "predictions": result.predictions, "headline": result.headline, "per_example": result.per_example,
           "source": result.source.value}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, ensure_ascii=False, default=str), encoding="utf-8")
    tmp.replace(path)


def load_result(path: Path, key: str) -> ContenderResult | None:
    """The result saved at ``path`` when it was computed under the same ``key``; None otherwise (absent,
    unreadable or made with another model, test sample or evaluation settings)."""
    import json

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if doc.get("key") != key:
        return None
    return ContenderResult(doc["name"], doc["description"], doc["metrics"], doc["predictions"], doc["headline"],
                           doc["per_example"], Source(doc["source"]))
