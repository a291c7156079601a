"""Cross-validation's evaluation: one result per contender over every fold's held-out examples.

With ``data.split.folds: k`` each fold's contenders (its trained arms, the base model, endpoints and the
baselines fitted on that fold's training part) answer that fold's test examples. Pooled, every example is
answered exactly once by a model that never trained on it, and the intervals and paired comparisons
resample all of them: k times the test examples of a single split, so intervals about half as wide at k=5.
"""

from __future__ import annotations

import math

from tunesmith.errors import DataError
from tunesmith.records import Example
from tunesmith.scoring.result import ContenderResult

SUMMED = ("failed_calls", "seconds", "unparseable_generate", "texts_cut")  # counts and times: added over folds
KEPT = ("scoring", "parameters", "asked_as")  # the same in every fold: the first fold's


def pool_results(task, folds: list[tuple[list[Example], list[ContenderResult]]]) -> tuple[list[Example], list]:
    """``(every fold's test examples, one result per contender over all of them)``. The task kind's metrics
    are computed again over the pooled predictions; other numbers are added (counts, seconds), kept (what
    is the same in every fold) or averaged with each fold's test size as its weight (free-generation
    accuracy, answer loss, latency)."""
    names = [r.name for r in folds[0][1]]
    for i, (_, results) in enumerate(folds[1:], 2):
        if [r.name for r in results] != names:
            raise DataError(f"fold {i} has contenders {[r.name for r in results]}, fold 1 {names}: every fold "
                            "must answer with the same contenders (an arm failed to train in one fold?)")
    test = [e for examples, _ in folds for e in examples]
    pooled = []
    for j, name in enumerate(names):
        parts = [(examples, results[j]) for examples, results in folds]
        pooled.append(_pool_one(task, name, parts, test))
    return test, pooled


def _pool_one(task, name: str, parts: list[tuple[list[Example], ContenderResult]], test: list[Example]):
    first = parts[0][1]
    parsed = [p for _, r in parts for p in r.headline]
    rows = [{**row, "fold": i} for i, (_, r) in enumerate(parts, 1) for row in r.predictions]
    metrics = task.metrics(parsed, test)
    sizes = [len(examples) for examples, _ in parts]
    for key in {k for _, r in parts for k in r.metrics} - set(metrics):
        values = [r.metrics.get(key) for _, r in parts]
        if key in KEPT:
            metrics[key] = first.metrics.get(key)
        elif key in SUMMED and all(isinstance(v, int | float) for v in values):
            metrics[key] = sum(values)
        elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            metrics[key] = sum(v * n for v, n in zip(values, sizes, strict=True)) / sum(sizes)
    if "mean_loss" in metrics and "perplexity" in metrics:
        metrics["perplexity"] = math.exp(metrics["mean_loss"])
    metrics["folds"] = len(parts)
    per = [v for _, r in parts for v in r.per_example]
    return ContenderResult(name, first.description, metrics, rows, parsed, per, first.source)


def fold_table(task, folds: list[tuple[list[Example], list[ContenderResult]]]) -> dict[str, str]:
    """The headline of every contender in every fold (how much a single split would have varied)."""
    fmt = task.fmt
    names = [r.name for r in folds[0][1]]
    return {name: " · ".join(fmt(results[j].metrics.get(task.headline)) for _, results in folds)
            for j, name in enumerate(names)}
