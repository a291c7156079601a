"""BANKING77 method search: train the classifier head under several settings on one split, score each.

The split is the one ``tunesmith run examples/banking77_full.yaml`` makes (the data stage of that
recipe: a stratified 20% of the official train file held out as the test split, seed 42). Each try is
an arm (the recipe's ``arms:`` form: a name and ``train`` overrides, e.g. epochs, learning rate, LoRA
rank, ``adapter: full``) trained with ``train_classifier`` exactly as ``tunesmith run`` trains a
``head: classifier`` arm, then scored on the first ``--first`` test messages (the run's
``eval.max_examples``) and on the whole test split, with 95% bootstrap intervals. One JSON line per
try goes to ``--out``. Tries run one after another; on a GPU a try over the full file takes about a
minute, on 2 CPU cores about 25-50 minutes per epoch (see docs/results.md).

    python benchmarks/banking77_methods.py --tries benchmarks/banking77_tries.yaml --out tries.jsonl
    python benchmarks/banking77_methods.py --tries benchmarks/banking77_tries.yaml --only r16-lr1e-3-e1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "banking77_full.yaml"


@contextlib.contextmanager
def no_bar(_label, _steps):
    yield lambda *a, **k: None


def device_name(placement) -> str:
    import torch

    if placement.device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, {placement.dtype}"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads, {placement.dtype}"


def score(model, tokenizer, test, labels) -> list[float]:
    """1.0 / 0.0 per test message: whether the head's most probable label is the gold one."""
    from tunesmith.models.heads import encode, predict_proba

    probs = predict_proba(model, tokenizer, encode(tokenizer, [e.inputs["text"] for e in test]), batch_size=64)
    return [float(labels[max(range(len(p)), key=p.__getitem__)] == e.target) for p, e in zip(probs, test, strict=True)]


def run_try(recipe, spec: dict, data, tokenizer, placement, first: int) -> dict:
    from rich.console import Console

    from tunesmith.config import ArmSpec, arm_recipe
    from tunesmith.machine.memory import peak_rss, reset_peak_rss
    from tunesmith.scoring.bootstrap import mean_ci
    from tunesmith.train.heads import train_classifier

    arm = arm_recipe(recipe, ArmSpec(name=spec["name"], train={"head": "classifier", **spec.get("train", {})}))
    import torch

    on_gpu = placement.device == "cuda"
    before = reset_peak_rss()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train_classifier(arm, data.splits["train"], data.labels, tokenizer, placement, no_bar,
                              Console(quiet=True))
    seconds = time.perf_counter() - start
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else (peak_rss() - before) / 2**20
    hits = score(result.model, tokenizer, data.splits["test"], data.labels)
    t = arm.train
    return {
        "try": spec["name"], "train": spec.get("train", {}),
        "adapter": t.adapter, "lora_r": t.lora.r if t.adapter != "full" else None, "epochs": t.epochs,
        "learning_rate": t.learning_rate, "batch_size": t.batch_size, "grouped": t.grouped,
        "train_rows": result.examples,
        "steps": t.max_steps or math.ceil(math.ceil(result.examples / (t.batch_size * t.grad_accum)) * t.epochs),
        "train_seconds": round(seconds, 1), "tokens_per_s": round(result.tokens / seconds, 1),
        "peak_train_mb": round(peak_mb), "trainable_params": result.trainable_params,
        f"accuracy_first_{first}": sum(hits[:first]) / len(hits[:first]), f"ci_first_{first}": mean_ci(hits[:first]),
        "accuracy_all": sum(hits) / len(hits), "ci_all": mean_ci(hits), "n_all": len(hits),
        "final_loss": next((r["train_loss"] for r in reversed(result.rows) if r.get("train_loss") is not None), None),
        "device": device_name(placement),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tries", type=Path, default=ROOT / "benchmarks" / "banking77_tries.yaml")
    ap.add_argument("--only", default="", help="comma-separated try names (default: all)")
    ap.add_argument("--first", type=int, default=600, help="also score the first N test messages (the run's n)")
    ap.add_argument("--precision", default="fp32", help="fp32 (as on CPU), bf16 or auto")
    ap.add_argument("--out", type=Path, default=Path("banking77_tries.jsonl"))
    ap.add_argument("--workdir", type=Path, default=Path("runs"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override KEY=VALUE")
    args = ap.parse_args()

    from rich.console import Console
    from transformers.utils import logging as hf_logging

    import tunesmith.kinds  # noqa: F401 - registers the task kinds the schema checks
    import tunesmith.train  # noqa: F401 - registers the training methods (their shapes and trainers)
    from tunesmith.config import load_recipe
    from tunesmith.data.prepare import prepare
    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.loading import load_tokenizer

    hf_logging.set_verbosity_error()
    recipe = load_recipe(RECIPE, [f"output_dir={args.workdir.resolve()}", "name=banking77-methods", *args.overrides])
    tries = yaml.safe_load(args.tries.read_text(encoding="utf-8"))
    if args.only:
        wanted = set(args.only.split(","))
        tries = [t for t in tries if t["name"] in wanted]
        if missing := wanted - {t["name"] for t in tries}:
            raise SystemExit(f"no try named {sorted(missing)} in {args.tries}")
    data = prepare(recipe, recipe.run_dir / "data", Console())
    tokenizer = load_tokenizer(recipe.model.name)
    placement = pick_placement(args.precision)
    print(f"train {len(data.splits['train'])} / test {len(data.splits['test'])} messages, {len(data.labels)} intents; "
          f"{device_name(placement)}; load average {os.getloadavg()[0]:.2f}", flush=True)
    for spec in tries:
        row = run_try(recipe, spec, data, tokenizer, placement, args.first)
        with args.out.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"{row['try']:>24}: accuracy {row[f'accuracy_first_{args.first}']:.1%} (first {args.first}), "
              f"{row['accuracy_all']:.1%} [{row['ci_all'][0]:.1%}, {row['ci_all'][1]:.1%}] (all {row['n_all']}); "
              f"{row['steps']} steps in {row['train_seconds']:.0f} s, {row['tokens_per_s']:.0f} tok/s, "
              f"peak {row['peak_train_mb']:,} MB", flush=True)


if __name__ == "__main__":
    main()
