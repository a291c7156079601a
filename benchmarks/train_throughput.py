"""tunesmith's SFT trainer vs plain TRL SFTTrainer, in one process, on the same real data.

Both sides get the embedded SmolLM2-135M-Instruct, the same seeded LoRA (r=16, alpha=32, all
linear layers), the same examples, batch size, learning rate, schedule and epochs. The peer is
TRL's SFTTrainer with its CPU-hostile defaults switched off (``bf16=False``,
``gradient_checkpointing=False``) and everything else left as TRL ships it: padding to the
longest example of a random batch, no packing, completion-only loss, entropy and token-accuracy
metrics. tunesmith's side is its default: random batches (as the peer's), each packed with a block-diagonal
mask, logits only at target positions.

Reported per side: wall time of ``train()``, effective (non-padding) tokens/s, peak resident
memory above the level before training (Linux VmHWM, reset before each side), the mean
training loss, the loss on held-out examples (scored one at a time, identically for both) and
MFU = effective tokens/s x 4N FLOPs (LoRA: forward 2N + input gradients 2N) / fp32 matmul peak.

    python benchmarks/train_throughput.py --data alpaca --examples 96
    python benchmarks/train_throughput.py --data nsmc --examples 160
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

SHARED = Path(
    os.environ.get("TUNESMITH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
MODEL = "smollm2-135m-instruct"
FP32_PEAK_GFLOPS = 165.0  # measured fp32 matmul peak of this machine kind (docs/benchmarks.md)


def load_rows(which: str, n: int, held_out: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Prompt/completion chat rows from the shared real data (shuffled with ``seed``)."""
    import random

    if which == "alpaca":
        raw = json.loads((SHARED / "instructions" / "llamafactory_alpaca_en_demo.json").read_text())
        rows = [
            (
                [{"role": "user", "content": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")}],
                r["output"],
            )
            for r in raw
        ]
    else:
        lines = (
            (SHARED / "reviews_ko_nsmc" / "nsmc_reviews_shared.jsonl")
            .read_text(encoding="utf-8")
            .splitlines()
        )
        raw = [json.loads(line) for line in lines]
        rows = [
            (
                [
                    {"role": "system", "content": "Rate the movie review from 1 to 10."},
                    {"role": "user", "content": r["review"]},
                ],
                str(r["rating"]),
            )
            for r in raw
        ]
    random.Random(seed).shuffle(rows)
    conv = [{"prompt": p, "completion": [{"role": "assistant", "content": c}]} for p, c in rows]
    return conv[:n], conv[n : n + held_out]


def fresh_model(seed: int):
    from tunesmith.config import LoraSection
    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.loading import load_model, wrap_adapter

    placement = pick_placement()
    model = load_model(MODEL, placement)
    return wrap_adapter(model, "lora", LoraSection(r=16, alpha=32, dropout=0.05), seed), placement


def run_tunesmith(rows, tokenizer, args, out: Path) -> dict:
    import tunesmith.kinds  # noqa: F401 - registers the task kinds the schema checks
    import tunesmith.train  # noqa: F401 - registers the training methods (their shapes and trainers)
    from tunesmith.config import validate_recipe
    from tunesmith.train.sft import build_trainer

    recipe = validate_recipe(
        {
            "name": "bench",
            "output_dir": str(out),
            "seed": args.seed,
            "data": {"path": "unused", "input_fields": ["text"], "target_field": "y"},
            "train": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "learning_rate": args.lr,
                "max_seq_length": args.max_len,
                "logging_steps": 1,
                "packing": not args.no_packing,
                "group_by_length": True if args.grouping else "auto",
            },
        }
    )
    model, placement = fresh_model(args.seed)
    tokenizer.padding_side = "right"
    trainer = build_trainer(recipe, model, tokenizer, rows, [], placement, out / "ours", save_strategy="no")
    return _timed_train(trainer, model)


def run_trl(rows, tokenizer, args, out: Path) -> dict:
    from datasets import Dataset
    from transformers import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    model, _ = fresh_model(args.seed)
    config = SFTConfig(
        output_dir=str(out / "trl"),
        seed=args.seed,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        max_length=args.max_len,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    tokenizer.padding_side = "right"
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    for cb in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(cb)
    return _timed_train(trainer, model)


def _timed_train(trainer, model) -> dict:
    from tunesmith.machine.memory import peak_rss, reset_peak_rss

    before = reset_peak_rss()
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    peak = peak_rss()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "seconds": seconds,
        "peak_mb": (peak - before) / 2**20,
        "mean_train_loss": result.training_loss,
        "last_logged_loss": losses[-1] if losses else None,
        "steps": trainer.state.global_step,
        "model": model.eval(),
    }


def held_out_loss(model, tokenizer, rows) -> float:
    """Mean completion-token loss on held-out rows, one example at a time (same code for both sides)."""
    import torch

    from tunesmith.data.formats.chat_rows import tokenize_rows
    from tunesmith.machine.packing import PackedCollator
    from tunesmith.train.trainer import completion_loss

    collate = PackedCollator(tokenizer.pad_token_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in tokenize_rows(rows, tokenizer):
            loss, _, n = completion_loss(model, collate([ex]))
            total += loss.item() * n
            count += n
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=["alpaca", "nsmc"], default="alpaca")
    ap.add_argument("--examples", type=int, default=96)
    ap.add_argument("--held-out", type=int, default=24)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-packing", action="store_true", help="tunesmith side without packing")
    ap.add_argument("--grouping", action="store_true", help="tunesmith side with length-grouped batches too")
    args = ap.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"shared data not found at {SHARED} (set TUNESMITH_SHARED_DATA)")

    import torch
    from transformers.utils import logging as hf_logging

    from tunesmith.data.formats.chat_rows import tokenize_rows
    from tunesmith.models.loading import load_tokenizer

    hf_logging.set_verbosity_error()
    tokenizer = load_tokenizer(MODEL)
    rows, held = load_rows(args.data, args.examples * 2, args.held_out, args.seed)
    lengths = [ex["length"] for ex in tokenize_rows(rows, tokenizer)]
    rows = [r for r, n in zip(rows, lengths, strict=True) if n <= args.max_len][: args.examples]
    lengths = [n for n in lengths if n <= args.max_len][: args.examples]
    tokens = int(sum(lengths) * args.epochs)
    n_params = sum(p.numel() for n, p in fresh_model(args.seed)[0].named_parameters() if "lora_" not in n)
    print(
        f"data {args.data}: {len(rows)} examples, {tokens:,} tokens, lengths {min(lengths)}-{max(lengths)}, "
        f"torch threads {torch.get_num_threads()}, model {n_params / 1e6:.1f} M parameters"
    )

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("tunesmith", run_tunesmith), ("trl", run_trl)):
            load_before = os.getloadavg()[0]
            res = fn(rows, tokenizer, args, Path(tmp))
            res["load"] = (load_before, os.getloadavg()[0])
            res["held_out_loss"] = held_out_loss(res.pop("model"), tokenizer, held)
            res["tokens_per_s"] = tokens / res["seconds"]
            res["mfu"] = res["tokens_per_s"] * 4 * n_params / (FP32_PEAK_GFLOPS * 1e9)
            results[name] = res
            gc.collect()
            print(
                f"{name:>10}: {res['seconds']:7.1f} s  {res['tokens_per_s']:7.1f} tok/s  "
                f"MFU {res['mfu']:.1%}  peak +{res['peak_mb']:7.0f} MB  steps {res['steps']}  "
                f"mean train loss {res['mean_train_loss']:.4f}  held-out loss {res['held_out_loss']:.4f}  "
                f"load avg {res['load'][0]:.1f}->{res['load'][1]:.1f}",
                flush=True,
            )
    ours, peer = results["tunesmith"], results["trl"]
    print(
        f"ratio tokens/s tunesmith/trl = {ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x; "
        f"peak memory ratio = {ours['peak_mb'] / peer['peak_mb']:.2f}; "
        f"held-out loss {ours['held_out_loss']:.4f} vs {peer['held_out_loss']:.4f}"
    )


if __name__ == "__main__":
    main()
