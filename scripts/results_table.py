"""The results table of docs/results.md, from run folders — nothing in it is typed by hand.

Two steps, so that a result outlives the machine it ran on:

    python scripts/results_table.py collect runs/banking77-full runs/price-amazon   # -> docs/results/<name>.json
    python scripts/results_table.py render                                          # -> docs/results.md table

``collect`` reads a finished run (config.resolved.yaml, eval/metrics.json, eval/comparisons.json,
timings.json, train/summary.json, command.txt) into one small JSON record; ``render`` rewrites the
table between the markers in docs/results.md from every record, leaving the prose around it alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "docs" / "results"
DOC = ROOT / "docs" / "results.md"
START, END = "<!-- results table: start -->", "<!-- results table: end -->"
PERCENT = {"accuracy", "field_f1"}  # headlines printed as percentages


def _json(path: Path, default=None):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default


def collect(run: Path) -> dict:
    """One run folder -> its record: every contender's headline with its interval, the best fine-tuned arm,
    the best LLM-free baseline, the paired verdict between them, training time, peak memory, command."""
    if not (run / "config.resolved.yaml").is_file():
        raise SystemExit(f"{run}: not a run folder (no config.resolved.yaml); pass runs/NAME of a finished run")
    from tunesmith.runs.folders import read_run

    folder = read_run(run)
    cfg, metrics = folder.config, folder.metrics
    if not metrics:
        raise SystemExit(f"{run}: no eval/metrics.json (the run has not finished its evaluation)")
    task = cfg["data"]["task"]
    h = folder.task.headline
    kinds = folder.kinds
    contenders = {name: {"kind": kinds[name], "value": m.get(h), "ci": m.get(f"{h}_ci95"), "n": m.get("n")}
                  for name, m in metrics.items()}
    arm, top, comparison = folder.verdict()
    verdict = comparison["verdict"] if comparison else None
    times = _json(run / "timings.json", {})
    peak, trained = None, []
    tops = [run, *sorted((run / "folds").glob("fold-*"))]  # the run, or each fold of a cross-validation
    for top_dir in tops:
        for arm_dir in [top_dir, *sorted((top_dir / "arms").glob("*"))]:
            summary = _json(arm_dir / "train" / "summary.json")
            if summary and (arm_dir == top_dir or arm_dir.name == arm) and summary.get("peak_memory_mb"):
                peak = max(peak or 0, summary["peak_memory_mb"])
            if summary and summary.get("seconds") is not None:
                trained.append(summary["seconds"])
    staged = sum(v for k, v in times.items() if k.startswith("arm "))
    command = (run / "command.txt").read_text(encoding="utf-8").strip() if (run / "command.txt").is_file() else None
    return {
        "name": cfg["name"],
        "task": task,
        "headline": h,
        "n": metrics.get("base", next(iter(metrics.values()), {})).get("n"),
        "contenders": contenders,
        "best_fine_tuned": arm,
        "best_baseline": top,
        "verdict": verdict,
        # each arm's own training time: a run that reused a finished arm (same settings) still counts it
        "train_seconds": round(max(staged, sum(trained)), 1),
        "stage_seconds": times,
        "peak_train_memory_mb": peak,
        "peak_run_memory_mb": _json(run / "memory.json", {}).get("the run (largest below)"),
        "command": command or f"tunesmith run ({cfg['name']})",
        "collected": date.today().isoformat(),
        "machine": f"{platform.machine()}, {_cpus()} CPU cores, " + (_gpu() or "no GPU"),
    }


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def _gpu() -> str | None:
    """The CUDA GPU's name, or None."""
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except ImportError:
        return None


def fmt(metric: str, value, ci) -> str:
    if value is None:
        return "–"
    one = (lambda v: f"{v:.1%}") if metric in PERCENT else (lambda v: f"{v:,.2f}")
    return one(value) + (f" [{one(ci[0])}, {one(ci[1])}]" if ci else "")


def row(rec: dict) -> str:
    h = rec["headline"]

    def cell(name):
        if not name:
            return "–"
        c = rec["contenders"][name]
        return f"{name}: {fmt(h, c['value'], c['ci'])}"

    base = "base" if "base" in rec["contenders"] else None
    peak = f"{rec['peak_train_memory_mb']:,.0f} MB" if rec["peak_train_memory_mb"] else "–"
    return (f"| {rec['name']} | {rec['task']} ({h}, n={rec['n']}) | {cell(base)} | {cell(rec['best_fine_tuned'])} | "
            f"{cell(rec['best_baseline'])} | {rec['verdict'] or '–'} | {rec['train_seconds']:,.0f} s / {peak} | "
            f"`{rec['command']}` |")


def table(records: list[dict]) -> str:
    lines = [
        "| run | task (headline, n) | base | best fine-tuned | best baseline | fine-tuned vs best baseline | "
        "train time / peak train memory | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(lines + [row(r) for r in records])


def render(records_dir: Path = RECORDS, doc: Path = DOC) -> None:
    records = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(records_dir.glob("*.json"))]
    text = doc.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{doc}: the markers {START} / {END} are missing")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{START}\n{table(records)}\n{END}{tail}", encoding="utf-8")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="run folders -> docs/results/<name>.json")
    c.add_argument("runs", nargs="+", type=Path)
    c.add_argument("--out", type=Path, default=RECORDS)
    r = sub.add_parser("render", help="docs/results/*.json -> the table in docs/results.md")
    r.add_argument("--records", type=Path, default=RECORDS)
    r.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    if args.command == "collect":
        args.out.mkdir(parents=True, exist_ok=True)
        for run in args.runs:
            rec = collect(run)
            (args.out / f"{rec['name']}.json").write_text(json.dumps(rec, indent=1, ensure_ascii=False) + "\n",
                                                          encoding="utf-8")
            print(row(rec))
    else:
        render(args.records, args.doc)


if __name__ == "__main__":
    main(sys.argv[1:])
