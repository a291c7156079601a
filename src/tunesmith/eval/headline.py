"""The headline the user cares about, and the arm the report recommends.

- ``eval.metric`` names the metric that leads the report and decides its verdict. Without it a classification
  test set where one label holds more than half the examples leads with macro-F1, and says why: there,
  always answering that label already scores a high accuracy (the issue a 76%-five-star review set showed).
- Macro-F1 is not a mean over examples, so its intervals and paired differences resample examples and compute
  it again on each resample (the same seeded resamples as every other interval).
- The arm the report recommends is the best on the validation split, never on the test split the report then
  shows; the report says which split chose it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tunesmith.errors import ConfigError
from tunesmith.scoring.result import ContenderResult

SET_METRICS = {"classification": ("macro_f1",)}  # metrics of the whole set, not a mean over examples
MAJORITY_SHARE = 0.5


def choose(task, metric: str | None, test) -> str | None:
    """Set ``task.headline`` from ``eval.metric`` (or the majority-label rule) and return why, or None when the
    kind's own headline stays."""
    allowed = (type(task).headline, *SET_METRICS.get(task.name, ()))
    if metric is not None:
        if metric not in allowed:
            raise ConfigError(f"eval.metric: '{metric}' is not a headline the {task.name} task offers; choose one of "
                              f"{', '.join(allowed)}")
        if metric == type(task).headline:
            return None
        task.headline = metric
        task.headline_reason = f"{metric} leads the report, as eval.metric asks"
        return task.headline_reason
    if task.name != "classification" or not test:
        return None
    counts: dict[str, int] = {}
    for e in test:
        counts[e.target] = counts.get(e.target, 0) + 1
    label, n = max(counts.items(), key=lambda kv: kv[1])
    if n / len(test) <= MAJORITY_SHARE:
        return None
    task.headline = "macro_f1"
    task.headline_reason = (f"macro-F1 leads the report: one label ('{label}') holds {n / len(test):.0%} of the test "
                            "set, so always answering it would already score that accuracy (set eval.metric to "
                            "choose)")
    return task.headline_reason


def statistic(task, r: ContenderResult) -> Callable[[np.ndarray], float] | None:
    """The headline computed on a resample (index array) of ``r``'s examples; None for a mean over examples."""
    if task.headline != "macro_f1":
        return None
    labels = list(task.labels)
    index = {label: i for i, label in enumerate(labels)}
    gold = np.array([index.get(row["gold"], -1) for row in r.predictions])
    pred = np.array([index.get(p, -1) if p is not None else -1 for p in r.headline])
    k = len(labels)

    def macro_f1(idx: np.ndarray) -> float:
        g, p = gold[idx], pred[idx]
        hit = g == p
        tp = np.bincount(g[hit & (g >= 0)], minlength=k)[:k]
        gold_n = np.bincount(g[g >= 0], minlength=k)[:k]
        pred_n = np.bincount(p[p >= 0], minlength=k)[:k]
        denom = gold_n + pred_n
        return float(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0).mean()) if k else float("nan")

    return macro_f1


def _samples(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(values: np.ndarray) -> list[float] | None:
    values = values[~np.isnan(values)]
    return None if values.size == 0 else [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def interval(task, r: ContenderResult, resamples: int, seed: int) -> list[float] | None:
    """The 95% interval of a set metric over resampled examples."""
    stat = statistic(task, r)
    n = len(r.predictions)
    if stat is None or n == 0 or resamples <= 0:
        return None
    return _interval(np.array([stat(idx) for idx in _samples(n, resamples, seed)]))


def paired(task, a: ContenderResult, b: ContenderResult, resamples: int, seed: int) -> tuple:
    """``(a − b on all examples, its 95% interval over the same resamples for both)`` for a set metric."""
    sa, sb = statistic(task, a), statistic(task, b)
    n = len(a.predictions)
    every = np.arange(n)
    mean = sa(every) - sb(every) if n else None
    if n == 0 or resamples <= 0:
        return mean, None
    return mean, _interval(np.array([sa(idx) - sb(idx) for idx in _samples(n, resamples, seed)]))


def is_set_metric(task) -> bool:
    return task.headline in SET_METRICS.get(task.name, ())


def recommend(task, on_val: list[ContenderResult], resamples: int = 1000, seed: int = 0) -> tuple[str, str] | None:
    """``(arm, why)``: the fine-tuned arm with the best headline on the validation split, when the paired 95%
    interval of its lead over the runner-up excludes zero. When it does not, the choice is not settled and the
    stated rule decides: the arm listed first in the recipe among those tied (``tunesmith init`` lists first the
    arm that won more of our measured tasks on this kind of machine). Never the test split."""
    from tunesmith.scoring.result import best_contender

    scored = [r for r in on_val if r.metrics.get(task.headline) is not None]
    name = best_contender(task, {r.name: r.metrics for r in scored}, [r.name for r in scored])
    if name is None:
        return None
    top = next(r for r in scored if r.name == name)
    listed = ", ".join(f"{r.name} {task.fmt(r.metrics[task.headline])}" for r in scored)
    chosen = (f"chosen on the validation split ({len(top.predictions)} examples: {listed}); the test split below "
              "only reports it")
    tied = [r for r in scored if r is top or overlaps(task, top, r, resamples, seed)]
    if len(tied) < 2:
        return top.name, chosen
    first = tied[0]  # scored keeps the recipe's order of arms
    return first.name, (f"the choice is not settled: on the validation split ({len(top.predictions)} examples: "
                        f"{listed}) the 95% interval of {top.name}'s lead over "
                        f"{', '.join(r.name for r in tied if r is not top)} includes no difference. By the rule for "
                        "an unsettled choice, the arm listed first in the recipe among those tied is recommended "
                        "(tunesmith init lists first the arm that won more of our measured tasks on this kind of "
                        "machine); a larger validation split can settle it. The test split below only reports it")


def overlaps(task, top: ContenderResult, other: ContenderResult, resamples: int, seed: int) -> bool:
    """True when the paired 95% interval of ``top`` minus ``other`` on the same examples includes zero."""
    from tunesmith.scoring.bootstrap import paired_difference

    if len(top.predictions) != len(other.predictions) or resamples <= 0:
        return False
    if is_set_metric(task):
        _, ci = paired(task, top, other, resamples, seed)
    elif top.per_example and len(top.per_example) == len(other.per_example):
        _, ci = paired_difference(top, other, resamples, seed)
    else:
        return False
    return ci is not None and ci[0] <= 0 <= ci[1]


FILE = "headline.json"


def save(eval_dir, task, recommended: tuple[str, str] | None = None) -> None:
    """``eval/headline.json``: the headline metric the report led with (and why), and the arm recommended on the
    validation split, so that readers of the run folder (the dashboard, the results table) show the same."""
    import json

    doc = {"metric": task.headline, "why": getattr(task, "headline_reason", None),
           "recommended": recommended[0] if recommended else None, "recommended_why": recommended[1] if recommended else None}
    (eval_dir / FILE).write_text(json.dumps(doc, indent=2, ensure_ascii=False), encoding="utf-8")


def load(eval_dir) -> dict:
    """What :func:`save` wrote, or {} (a run from before it, or none)."""
    import json

    try:
        return json.loads((eval_dir / FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
