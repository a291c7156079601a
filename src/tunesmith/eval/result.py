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


@dataclass
class EvalRun:
    """What one evaluation wrote: the eval folder, its task kind, every contender's result and the reports."""

    eval_dir: Path
    task: object  # tunesmith.tasks.TaskKind
    results: list[ContenderResult]
    report_md: Path
    report_html: Path
    summary: dict = field(default_factory=dict)
    report: object = None  # the eval report (tunesmith.eval.report.Report), re-rendered into the run's report.md
