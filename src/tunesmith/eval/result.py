"""What one contender's evaluation produced: metrics, per-example rows and the per-example
headline values the bootstrap resamples."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ContenderResult:
    name: str
    description: str
    metrics: dict
    predictions: list[dict] = field(default_factory=list)
    headline: list = field(default_factory=list)  # the parsed predictions behind the headline metric
    per_example: list[float | None] = field(default_factory=list)  # headline metric per example (bootstrap)
    kind: str = "llm"  # "llm" (local model), "endpoint" or "baseline"


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
