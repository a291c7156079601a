"""What one contender's evaluation produced: metrics, per-example rows and the per-example
headline values the bootstrap resamples."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ContenderResult:
    name: str
    description: str
    metrics: dict
    predictions: list[dict] = field(default_factory=list)
    headline: list = field(default_factory=list)  # the parsed predictions behind the headline metric
    per_example: list[float | None] = field(default_factory=list)  # headline metric per example (bootstrap)
    kind: str = "llm"  # "llm" (local model), "endpoint" or "baseline"
