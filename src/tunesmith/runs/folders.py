"""The experiments of a runs folder (what ``tunesmith run`` wrote), read for the dashboard.

A run is a folder directly under the runs folder with a ``config.resolved.yaml``. Its summary is
the best fine-tuned contender against the best LLM-free baseline on the task's headline metric,
with the paired verdict from ``eval/comparisons.json`` — the same sentence the report leads with.
Names are looked up among the folders found, never joined to a path as given.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml


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


def contender_kinds(config: dict, metrics: dict, task) -> dict[str, str]:
    """base, baseline, endpoint or fine-tuned for every contender in metrics.json."""
    baselines = set(task.baseline_names()) if task else set()
    endpoints = {e.get("name") for e in (config.get("eval") or {}).get("endpoints") or []}
    kinds = {}
    for name in metrics:
        kinds[name] = ("base" if name == "base" else "baseline" if name in baselines
                       else "endpoint" if name in endpoints else "fine-tuned")
    return kinds


def _best(task, metrics: dict, names: list[str]) -> str | None:
    scored = [n for n in names if metrics[n].get(task.headline) is not None]
    if not scored:
        return None
    pick = max if task.higher_is_better else min
    return pick(scored, key=lambda n: metrics[n][task.headline])


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
    try:
        config = yaml.safe_load((folder / "config.resolved.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        config = {}  # listed by its folder name; a broken file must not hide the other runs
    config = config if isinstance(config, dict) else {}
    task_name = (config.get("data") or {}).get("task") or "classification"
    metrics = _read_json(folder / "eval" / "metrics.json", {})
    comps = _read_json(folder / "eval" / "comparisons.json", [])
    report = folder / "report.html"
    stamp = max((p.stat().st_mtime for p in (report, folder / "eval" / "metrics.json", folder / "config.resolved.yaml")
                 if p.is_file()), default=None)
    out = {"id": run_id, "object": "tunesmith.run", "name": config.get("name") or run_id, "task": task_name,
           "created_at": int(stamp) if stamp else None, "has_report": report.is_file(), "evaluated": bool(metrics),
           "headline_metric": None, "best": None, "best_baseline": None, "verdict": None, "difference": None}
    task = _task(task_name, (config.get("data") or {}).get("task_options"))
    if task is None or not metrics:
        return out | ({"table": []} if with_table else {})
    kinds = contender_kinds(config, metrics, task)
    arm = _best(task, metrics, [n for n, k in kinds.items() if k == "fine-tuned"])
    baseline = _best(task, metrics, [n for n, k in kinds.items() if k == "baseline"])
    h = task.headline
    out |= {"headline_metric": h, "higher_is_better": task.higher_is_better,
            "best": arm and {"name": arm, "display": task.fmt(metrics[arm].get(h))},
            "base": {"display": task.fmt(metrics["base"].get(h))} if "base" in metrics else None,
            "best_baseline": baseline and {"name": baseline, "display": task.fmt(metrics[baseline].get(h))}}
    top = next((c for c in comps if c.get("a") == arm and c.get("b") == baseline and c.get("b_is_baseline")), None)
    if top:
        out |= {"verdict": top["verdict"],
                "difference": task.diff_fmt(top["diff"]) + (" " + _ci(task, top.get("ci95"), task.diff_fmt)
                                                            if top.get("ci95") else "")}
    if with_table:
        out["table"] = headline_table(task, metrics, kinds)
    return out


def list_runs(root: Path) -> list[dict]:
    """Every run's summary, newest first."""
    runs = [run_summary(rid, folder) for rid, folder in find_runs(root).items()]
    return sorted(runs, key=lambda r: r["created_at"] or 0, reverse=True)
