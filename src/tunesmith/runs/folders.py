"""The experiments of a runs folder (what ``tunesmith run`` wrote), read for the dashboard and the results table.

A run is a folder directly under the runs folder with a ``config.resolved.yaml``. Its summary is
the best fine-tuned contender against the best LLM-free baseline on the task's headline metric,
with the paired verdict from ``eval/comparisons.json`` — the same sentence the report leads with.
Names are looked up among the folders found, never joined to a path as given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from tunesmith.scoring.result import baseline_comparison, best_contender, contender_kind


def find_runs(root: Path) -> dict[str, Path]:
    """Run id (folder name) → folder, for every folder under ``root`` holding a resolved config."""
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / "config.resolved.yaml").is_file()}


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def _task(name: str, options: dict | None = None):
    from tunesmith.kinds import kind_class

    try:
        return kind_class(name)(None, None, options)
    except (KeyError, ValueError):
        return None


@dataclass
class RunFolder:
    """What a finished run wrote, read once: its resolved config, every contender's metrics and kind, the paired
    comparisons, and its task kind (None when unknown). The dashboard and the results table read runs through it."""

    folder: Path
    config: dict
    metrics: dict
    comparisons: list
    task: object

    @property
    def kinds(self) -> dict[str, str]:
        """base, fine-tuned, baseline or endpoint for every contender."""
        return {name: contender_kind(name, m) for name, m in self.metrics.items()}

    def best(self, kind: str) -> str | None:
        """The contender of ``kind`` with the best headline value."""
        return best_contender(self.task, self.metrics, [n for n, k in self.kinds.items() if k == kind])

    def verdict(self) -> tuple[str | None, str | None, dict | None]:
        """The arm recommended on the validation split (else the best fine-tuned contender), the best baseline, and
        their paired comparison."""
        from tunesmith.eval.headline import load

        chosen = load(self.folder / "eval").get("recommended")
        arm = chosen if chosen in self.metrics else self.best("fine-tuned")
        baseline = self.best("baseline")
        return arm, baseline, baseline_comparison(self.comparisons, arm, baseline)


def read_run(folder: Path) -> RunFolder:
    """The run at ``folder``; a broken or missing file reads as empty, so one bad run never hides the others."""
    try:
        config = yaml.safe_load((folder / "config.resolved.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    config = config if isinstance(config, dict) else {}
    data = config.get("data") or {}
    task = _task(data.get("task") or "classification", data.get("task_options"))
    metric = _read_json(folder / "eval" / "headline.json", {}).get("metric")
    if task is not None and metric:  # the headline the report led with (eval.metric, or macro-F1 for a majority label)
        task.headline = metric
    return RunFolder(folder, config, _read_json(folder / "eval" / "metrics.json", {}),
                     _read_json(folder / "eval" / "comparisons.json", []), task)


def _ci(task, ci, fmt) -> str:
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]" if ci else ""


def headline_table(task, metrics: dict, kinds: dict[str, str]) -> list[dict]:
    """One row per contender: its headline value and 95% interval, and the paired difference vs base."""
    h = task.headline
    rows = []
    for name, m in metrics.items():
        diff = m.get(f"{h}_diff_vs_base")
        rows.append({"contender": name, "kind": kinds[name], "value": m.get(h), "display": task.fmt(m.get(h)),
                     "ci95": _ci(task, m.get(f"{h}_ci95"), task.fmt), "n": m.get("n"),
                     "diff_vs_base": None if diff is None else task.diff_fmt(diff) + (
                         " " + _ci(task, m.get(f"{h}_diff_vs_base_ci95"), task.diff_fmt)
                         if m.get(f"{h}_diff_vs_base_ci95") else "")})
    return rows


def run_summary(run_id: str, folder: Path, with_table: bool = False) -> dict:
    """What the experiments list shows for one run (and, with ``with_table``, its headline table)."""
    run = read_run(folder)
    metrics, task = run.metrics, run.task
    report = folder / "report.html"
    stamp = max((p.stat().st_mtime for p in (report, folder / "eval" / "metrics.json", folder / "config.resolved.yaml")
                 if p.is_file()), default=None)
    out = {"id": run_id, "object": "tunesmith.run", "name": run.config.get("name") or run_id,
           "task": (run.config.get("data") or {}).get("task") or "classification",
           "created_at": int(stamp) if stamp else None, "has_report": report.is_file(), "evaluated": bool(metrics),
           "headline_metric": None, "best": None, "best_baseline": None, "verdict": None, "difference": None}
    if task is None or not metrics:
        return out | ({"table": []} if with_table else {})
    arm, baseline, top = run.verdict()
    h = task.headline
    out |= {"headline_metric": h, "higher_is_better": task.higher_is_better,
            "best": arm and {"name": arm, "display": task.fmt(metrics[arm].get(h))},
            "base": {"display": task.fmt(metrics["base"].get(h))} if "base" in metrics else None,
            "best_baseline": baseline and {"name": baseline, "display": task.fmt(metrics[baseline].get(h))}}
    if top:
        out |= {"verdict": top["verdict"],
                "difference": task.diff_fmt(top["diff"]) + (" " + _ci(task, top.get("ci95"), task.diff_fmt)
                                                            if top.get("ci95") else "")}
    if with_table:
        out["table"] = headline_table(task, metrics, run.kinds)
    return out


def list_runs(root: Path) -> list[dict]:
    """Every run's summary, newest first."""
    runs = [run_summary(rid, folder) for rid, folder in find_runs(root).items()]
    return sorted(runs, key=lambda r: r["created_at"] or 0, reverse=True)
