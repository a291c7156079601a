"""docs/results.md from run folders: one row per run — task, base, the best fine-tuned arm, the best
LLM-free baseline (each with its 95% interval), whether the fine-tune beats that baseline (paired
bootstrap), training time and peak memory, and the exact command. Nothing in the table is typed by hand.

    python scripts/results_table.py runs/price-amazon runs/stars-arms > docs/results.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

HIGHER = {"accuracy": True, "f1": True, "chrf": True, "mae": False}


def fmt(metric: str, value, ci) -> str:
    if value is None:
        return "–"
    one = (lambda v: f"{v:.1%}") if metric == "accuracy" else (lambda v: f"{v:,.2f}")
    return one(value) + (f" [{one(ci[0])}, {one(ci[1])}]" if ci else "")


def row(run: Path) -> str:
    cfg = yaml.safe_load((run / "config.resolved.yaml").read_text(encoding="utf-8"))
    metrics = json.loads((run / "eval" / "metrics.json").read_text(encoding="utf-8"))
    comps = json.loads((run / "eval" / "comparisons.json").read_text(encoding="utf-8"))
    task = cfg["data"]["task"]
    h = {"classification": "accuracy", "regression": "mae", "qa": "f1", "generation": "chrf"}[task]
    sign = 1 if HIGHER[h] else -1
    llm = {k: m for k, m in metrics.items() if m.get("scoring") != "direct prediction" and "failed_calls" not in m}
    arms = {k: m for k, m in llm.items() if k != "base"}
    baselines = {k: m for k, m in metrics.items() if m.get("scoring") == "direct prediction"}

    def best(group: dict) -> str | None:
        scored = [k for k, m in group.items() if m.get(h) is not None]
        return max(scored, key=lambda k: sign * group[k][h]) if scored else None

    arm, top = best(arms), best(baselines)
    verdict = next((c["verdict"] for c in comps if c["a"] == arm and c["b"] == top), "–")
    times = json.loads((run / "timings.json").read_text()) if (run / "timings.json").is_file() else {}
    train_s = sum(v for k, v in times.items() if k.startswith("arm "))
    peak = "–"
    for arm_dir in [run, *sorted((run / "arms").glob("*"))]:
        summary = arm_dir / "train" / "summary.json"
        if summary.is_file() and (arm_dir == run or arm_dir.name == arm):
            mb = json.loads(summary.read_text())["peak_memory_mb"]
            peak = f"{mb:,.0f} MB" if mb else "– (no logged step)"
    command = (run / "command.txt").read_text().strip() if (run / "command.txt").is_file() else f"tunesmith run ({run.name})"
    n = metrics.get("base", {}).get("n", "–")

    def cell(name):
        return f"{name}: {fmt(h, metrics[name].get(h), metrics[name].get(f'{h}_ci95'))}" if name else "–"

    return (f"| {cfg['name']} | {task} ({h}, n={n}) | {cell('base' if 'base' in metrics else None)} | {cell(arm)} | "
            f"{cell(top)} | {verdict} | {train_s:,.0f} s / {peak} | `{command}` |")


def main(runs: list[str]) -> None:
    print("# Results\n")
    print("Produced by `python scripts/results_table.py RUN...` from the run folders (eval/metrics.json, "
          "eval/comparisons.json, timings.json, train/summary.json, command.txt). 95% bootstrap intervals over "
          "the test examples; 'vs best baseline' is the paired bootstrap verdict of the best fine-tuned arm "
          "against the best LLM-free baseline on the same examples.\n")
    print("| run | task (headline, n) | base | best fine-tuned | best baseline | fine-tuned vs best baseline | "
          "train time / peak memory | command |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(row(Path(r)))


if __name__ == "__main__":
    main(sys.argv[1:])
