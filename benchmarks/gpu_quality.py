"""Quality on the GPU path: the demo recipe and banking77_full's LLM arms trained on the path this machine chooses
(bf16 on a CUDA GPU) and in QLoRA, against the CPU fp32 runs of the same recipes on the same test rows.

The fine-tuned model on the GPU path must reach the CPU fp32 accuracy within 2 points. Each case runs the
recipe as a user would (``tunesmith run``, one process per run) with the real embedded model (SmolLM2-135M);
the split and the scored test sample are seeded, so the test rows are the CPU run's. The CPU references are run
records of this repository (``docs/results/<name>.json``, from ``scripts/results_table.py collect``), read here,
never typed in:

- ``demo``: ``examples/banking77.yaml`` (10 intents, generative LoRA SFT, label scoring, 150 test rows) against
  ``docs/results/banking77-demo.json`` (``finetuned``);
- ``full``: ``examples/banking77_full.yaml``'s LLM arms (LoRA + classifier head, and generative LoRA SFT on 3,000
  messages; the MiniLM arm is an encoder and has no GPU-path question) on the same 600 held-out messages, against
  ``docs/results/banking77-full-arms.json`` (``head``, ``generative``). Its training file is BANKING77's official
  train split under ``--shared`` (default ``../shared/data``).

Variants: ``auto`` (the path :func:`tunesmith.machine.path.decide` picks: bf16, TF32, fused AdamW, Liger where
installed on a CUDA GPU; fp32 on a CPU) and ``qlora`` (``train.adapter: qlora``: NF4 base, bf16 compute, paged 8-bit
AdamW; CUDA only, noted and skipped elsewhere). ``--record-to DIR`` writes each run's record there.

    python benchmarks/gpu_quality.py                        # on a GPU: demo and full, auto and qlora
    python benchmarks/gpu_quality.py --cases demo --smoke   # CPU smoke run: 2 steps, 8 test rows
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "docs" / "results"
WITHIN = 0.02  # the GPU path must reach the CPU fp32 accuracy within 2 points


@dataclass(frozen=True)
class Case:
    name: str
    recipe: str
    reference: str  # docs/results/<reference>.json: the CPU fp32 run of the same recipe and test rows
    arms: tuple[str, ...]  # the contenders compared (fine-tuned arms of the run)
    overrides: tuple[str, ...] = ()
    needs_shared: bool = False


CASES = {c.name: c for c in [
    Case("demo", "examples/banking77.yaml", "banking77-demo", ("finetuned",)),
    Case("full", "examples/banking77_full.yaml", "banking77-full-arms", ("head", "generative"),
         ("arms=[{name: head, train: {head: classifier, learning_rate: 1.0e-3}}, "
          "{name: generative, train: {examples: 3000}}]",), needs_shared=True),
]}
VARIANTS = {"auto": (), "qlora": ("train.adapter=qlora",)}
SMOKE = ("train.max_steps=2", "eval.max_examples=8", "eval.bootstrap=0")


def reference(case: Case, records: Path) -> dict | None:
    """The CPU run record of ``case`` (None when the repository has none)."""
    path = records / f"{case.reference}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def command(case: Case, variant: str, out: Path, shared: Path, smoke: bool) -> tuple[str, list[str]]:
    """The run's name and its ``tunesmith run`` command line."""
    name = f"gpu-quality-{case.name}-{variant}" + ("-smoke" if smoke else "")
    sets = [f"name={name}", f"output_dir={out}", *case.overrides, *VARIANTS[variant], *(SMOKE if smoke else ())]
    if case.needs_shared:
        sets.append(f"data.splits.train={shared / 'banking77' / 'banking77_train.csv'}")
    cmd = [sys.executable, "-m", "tunesmith", "run", str(ROOT / case.recipe)]
    for s in sets:
        cmd += ["--set", s]
    return name, cmd


def run_case(cmd: list[str], log: Path, timeout: float) -> tuple[int, float]:
    """Run one recipe (its output in ``log``); returns (exit code, seconds)."""
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        try:
            code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT,
                                  env=os.environ | {"PYTHONUNBUFFERED": "1"}).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - start


def arm_summary(run: Path, arm: str) -> dict:
    """The arm's train/summary.json (the run's own for a one-arm recipe)."""
    for folder in (run / "arms" / arm / "train", run / "train"):
        if (folder / "summary.json").is_file():
            return json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    return {}


def compare(value: float | None, ref: float | None) -> tuple[str, str]:
    """(Δ in points, verdict) of a GPU-path accuracy against the CPU fp32 one."""
    if value is None or ref is None:
        return "–", "no reference" if ref is None else "no result"
    delta = value - ref
    return f"{100 * delta:+.1f}", "within 2 points" if delta >= -WITHIN else "MORE than 2 points below"


def rows_of(case: Case, variant: str, run: Path, ref: dict | None, smoke: bool) -> list[str]:
    metrics = json.loads((run / "eval" / "metrics.json").read_text(encoding="utf-8"))
    lines = []
    for arm in case.arms:
        m, s = metrics.get(arm, {}), arm_summary(run, arm)
        value, ci = m.get("accuracy"), m.get("accuracy_ci95")
        ref_c = (ref or {}).get("contenders", {}).get(arm, {})
        ref_value = None if smoke else ref_c.get("value")  # a smoke run scores other rows: nothing to compare
        delta, verdict = compare(value, ref_value)
        path = s.get("train_path") or {}
        where = f"{path.get('device', '?')} {path.get('dtype', '?')}" + (
            " NF4" if path.get("quantization") else "") + f", {path.get('attention', '?')}, {path.get('optimizer', '?')}"
        acc = "–" if value is None else f"{value:.1%}" + (f" [{ci[0]:.1%}, {ci[1]:.1%}]" if ci else "")
        lines.append(f"| {case.name} | {arm} | {variant} | {where} | {acc} | n={m.get('n')} | "
                     f"{'–' if ref_value is None else f'{ref_value:.1%}'} | {delta} | {verdict} | "
                     f"{s.get('seconds', 0):,.0f} s | {s.get('peak_memory_mb', 0):,.0f} MB |")
    return lines


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {', '.join(CASES)}")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--out", type=Path, default=ROOT / "runs", help="where the runs go")
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get("TUNESMITH_SHARED_DATA", ROOT.parent / "shared" / "data")))
    ap.add_argument("--records", type=Path, default=RECORDS, help="where the CPU references are read")
    ap.add_argument("--record-to", type=Path, default=None, help="write each run's record (results_table collect) here")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--smoke", action="store_true", help="2 steps and 8 test rows per run: a CPU check of the script")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    print(f"device: {torch.cuda.get_device_name() if cuda else f'CPU ({os.cpu_count()} cores)'}; torch {torch.__version__}"
          + (" · SMOKE run (2 steps, 8 test rows): checks the script, measures nothing" if args.smoke else ""))
    lines = ["| recipe | arm | variant | path | accuracy [95% CI] | test rows | CPU fp32 (same rows) | Δ points | "
             "verdict | train time | peak train memory |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    failed = 0
    for cname in args.cases.split(","):
        case = CASES[cname.strip()]
        ref = reference(case, args.records)
        if ref is None:
            print(f"note: {case.name}: no CPU record {args.records / (case.reference + '.json')}; no comparison")
        if case.needs_shared and not (args.shared / "banking77" / "banking77_train.csv").is_file():
            print(f"note: {case.name} needs BANKING77's train split under {args.shared} (--shared); skipped")
            continue
        for variant in args.variants.split(","):
            if variant == "qlora" and not cuda:
                print(f"note: {case.name} {variant}: QLoRA needs a CUDA GPU (bitsandbytes 4-bit); skipped")
                continue
            name, cmd = command(case, variant, args.out.resolve(), args.shared.resolve(), args.smoke)
            args.out.mkdir(parents=True, exist_ok=True)
            print(f"{name}: {' '.join(cmd[2:])}", flush=True)
            code, seconds = run_case(cmd, args.out / f"{name}.log", args.timeout)
            run = args.out / name
            if code != 0 or not (run / "eval" / "metrics.json").is_file():
                failed += 1
                tail = (args.out / f"{name}.log").read_text(encoding="utf-8", errors="replace")[-3000:]
                print(f"{name}: failed (exit {code}) after {seconds:.0f} s; the log's end:\n{tail}")
                continue
            print(f"{name}: {seconds:.0f} s")
            lines += rows_of(case, variant, run, ref, args.smoke)
            print(lines[-1], flush=True)
            if args.record_to:
                subprocess.run([sys.executable, str(ROOT / "scripts" / "results_table.py"), "collect", str(run),
                                "--out", str(args.record_to)], check=True)
    print("\n" + "\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
