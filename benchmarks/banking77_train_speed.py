"""BANKING77 training speed: tunesmith's classifier head (the method chosen for BANKING77) vs plain TRL.

Three sides train, one after another in one process, on the same random BANKING77 messages with the
same seeded LoRA (r=16, alpha=32, all linear layers), batch size, epochs and schedule:

- ``head-grouped``: ``tunesmith``'s ``train_classifier`` as ``tunesmith run`` calls it (``head:
  classifier``), with its default length-grouped batches;
- ``head-random``: the same with ``group_by_length: false`` (random batches, the earlier default);
- ``trl-sft``: plain TRL ``SFTTrainer`` (the peer of benchmarks/train_throughput.py: CPU-hostile
  defaults ``bf16`` and gradient checkpointing off, everything else as TRL ships it) learning to
  write the intent after a chat prompt, the usual generative way.

Reported per side: wall time of training, messages/s, each side's own non-padding tokens/s (the head
reads the message only; SFT reads the chat template, message and label), peak resident memory above
the level before training (Linux VmHWM, reset before each side) and, for the two head sides, accuracy
on held-out messages (TRL's SFT model is not scored here: it needs label scoring over 77 labels, which
``tunesmith run`` does in its evaluation stage).

    python benchmarks/banking77_train_speed.py --examples 640 --held-out 400
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import random
import tempfile
import time
from pathlib import Path

SHARED = Path(
    os.environ.get("TUNESMITH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
MODEL = "smollm2-135m-instruct"
SYSTEM = "Classify the banking customer message by intent."


def load_messages(n: int, held_out: int, seed: int):
    """``n`` training and ``held_out`` test (text, intent) pairs drawn at random from the train file."""
    with open(SHARED / "banking77" / "banking77_train.csv", newline="", encoding="utf-8") as fh:
        rows = [(r["text"], r["category"]) for r in csv.DictReader(fh)]
    random.Random(seed).shuffle(rows)
    return rows[:n], rows[n : n + held_out], sorted({label for _, label in rows})


def recipe_for(args, out: Path, grouped: bool):
    import tunesmith.kinds  # noqa: F401 - registers the task kinds the schema checks
    import tunesmith.train  # noqa: F401 - registers the training methods (their shapes and trainers)
    from tunesmith.config import validate_recipe

    return validate_recipe({
        "name": "bench",
        "output_dir": str(out),
        "seed": args.seed,
        "model": {"name": MODEL},
        "data": {"path": "unused", "input_fields": ["text"], "target_field": "category", "prompt": "{text}"},
        "train": {
            "head": "classifier",
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "learning_rate": args.lr,
            "max_seq_length": 96,
            "logging_steps": 5,
            "group_by_length": "auto" if grouped else False,
        },
    })


def run_head(train, held, labels, tokenizer, args, out: Path, grouped: bool) -> dict:
    from banking77_methods import no_bar, score  # beside this script
    from rich.console import Console

    from tunesmith.machine.memory import peak_rss, reset_peak_rss
    from tunesmith.machine.placement import pick_placement
    from tunesmith.records import Example
    from tunesmith.train.heads import train_classifier

    recipe = recipe_for(args, out / ("grouped" if grouped else "random"), grouped)
    examples = [Example(f"m{i}", {"text": t}, label) for i, (t, label) in enumerate(train)]
    placement = pick_placement()
    before = reset_peak_rss()
    start = time.perf_counter()
    result = train_classifier(recipe, examples, labels, tokenizer, placement, no_bar, Console(quiet=True))
    seconds = time.perf_counter() - start
    peak = peak_rss()
    hits = score(result.model, tokenizer, [Example(f"t{i}", {"text": t}, label) for i, (t, label) in enumerate(held)],
                 labels)
    return {"seconds": seconds, "peak_mb": (peak - before) / 2**20, "tokens": result.tokens,
            "accuracy": sum(hits) / len(hits)}


def run_trl(train, tokenizer, args, out: Path) -> dict:
    from datasets import Dataset
    from transformers import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    from tunesmith.config import LoraSection
    from tunesmith.machine.memory import peak_rss, reset_peak_rss
    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.loading import load_model, wrap_adapter

    rows = [{"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": t}],
             "completion": [{"role": "assistant", "content": label}]} for t, label in train]
    model = wrap_adapter(load_model(MODEL, pick_placement()), "lora", LoraSection(r=16, alpha=32, dropout=0.05),
                         args.seed)
    config = SFTConfig(
        output_dir=str(out / "trl"), seed=args.seed, num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=0.05, max_length=256, logging_steps=5, save_strategy="no", report_to=[], use_cpu=True,
        bf16=False, gradient_checkpointing=False, disable_tqdm=True,
    )
    tokenizer.padding_side = "right"
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    for cb in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(cb)
    tokens = sum(len(r["input_ids"]) for r in trainer.train_dataset) * args.epochs
    before = reset_peak_rss()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb": (peak_rss() - before) / 2**20, "tokens": tokens, "accuracy": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=640)
    ap.add_argument("--held-out", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sides", default="head-grouped,head-random,trl-sft")
    args = ap.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"shared data not found at {SHARED} (set TUNESMITH_SHARED_DATA)")

    import torch
    from transformers.utils import logging as hf_logging

    from tunesmith.models.loading import load_tokenizer

    hf_logging.set_verbosity_error()
    tokenizer = load_tokenizer(MODEL)
    train, held, labels = load_messages(args.examples, args.held_out, args.seed)
    print(f"BANKING77: {len(train)} training messages ({len({lbl for _, lbl in train})} intents), "
          f"{len(held)} held out, {args.epochs} epoch(s), batch {args.batch_size}, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sides.split(","):
            load_before = os.getloadavg()[0]
            if side == "trl-sft":
                res = run_trl(train, tokenizer, args, Path(tmp))
            else:
                res = run_head(train, held, labels, tokenizer, args, Path(tmp), grouped=side == "head-grouped")
            gc.collect()
            res["messages_per_s"] = len(train) * args.epochs / res["seconds"]
            res["tokens_per_s"] = res["tokens"] / res["seconds"]
            results[side] = res
            acc = "–" if res["accuracy"] is None else f"{res['accuracy']:.1%}"
            print(f"{side:>13}: {res['seconds']:7.1f} s  {res['messages_per_s']:6.2f} messages/s  "
                  f"{res['tokens_per_s']:7.1f} own tok/s  peak +{res['peak_mb']:6.0f} MB  held-out accuracy {acc}  "
                  f"load avg {load_before:.1f}->{os.getloadavg()[0]:.1f}", flush=True)
    ours = results.get("head-grouped")
    for peer in ("head-random", "trl-sft"):
        if ours and peer in results:
            p = results[peer]
            print(f"head-grouped vs {peer}: {p['seconds'] / ours['seconds']:.2f}x faster per message, "
                  f"tokens/s ratio {ours['tokens_per_s'] / p['tokens_per_s']:.2f}, "
                  f"peak memory ratio {ours['peak_mb'] / p['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
