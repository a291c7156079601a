"""What a win costs: the encoder head arms vs the LLM head on the same Korean reviews (NSMC polarity).

Each side trains a classifier head on the same random 1-star / 5-star NSMC reviews with the same batch
size, epochs and schedule, through ``train_classifier`` exactly as ``tunesmith run`` calls it, then answers
the same held-out reviews:

- ``llm-head``: the embedded 135M decoder (smollm2-135m-instruct) with LoRA r=16 on every linear layer
  and a classifier head on the last token (the head arm of examples/nsmc_binary.yaml);
- ``e5-full``: multilingual-e5-small (118M; 96M of it the input-embedding matrix) with every weight
  trained (the e5-head arm of examples/nsmc_binary.yaml);
- ``e5-frozen``: the same with ``train.freeze_embeddings: true`` (the embedding matrix fixed, no
  gradient or optimizer state for it; the e5-head arm of examples/nsmc_stars.yaml).

Reported per side: training wall time, reviews/s and non-padding tokens/s (each model's own tokenizer:
e5's reads Korean in far fewer tokens than the decoder's), peak resident memory above the level before
training (Linux VmHWM, reset before each side), held-out accuracy, and inference latency per review one
at a time (what a served request pays) and per review in batches of 32 (what evaluation pays).

    python benchmarks/head_arms.py --examples 480 --held-out 200
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import tempfile
import time
from pathlib import Path

SHARED = Path(
    os.environ.get("TUNESMITH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
LABELS = ["1", "5"]
SIDES = {
    "llm-head": {"model": "smollm2-135m-instruct", "train": {"adapter": "lora", "learning_rate": 1e-3}},
    "e5-full": {"model": "multilingual-e5-small", "train": {"adapter": "full", "learning_rate": 5e-5}},
    "e5-frozen": {"model": "multilingual-e5-small",
                  "train": {"adapter": "full", "learning_rate": 5e-5, "freeze_embeddings": True}},
}


def load_reviews(n: int, held_out: int, seed: int):
    """``n`` training and ``held_out`` test (review, "1"|"5") pairs, drawn at random from the polar reviews."""
    rows = []
    with open(SHARED / "reviews_ko_nsmc" / "nsmc_reviews_shared.jsonl", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if str(r["stars_5"]) in LABELS and r["review"].strip():
                rows.append((r["review"], str(r["stars_5"])))
    rows = list(dict(rows).items())  # one row per distinct review text
    random.Random(seed).shuffle(rows)
    return rows[:n], rows[n : n + held_out]


def recipe_for(side: str, args, out: Path):
    import tunesmith.kinds  # noqa: F401 - registers the task kinds the schema checks
    import tunesmith.train  # noqa: F401 - registers the training methods (their shapes and trainers)
    from tunesmith.config import validate_recipe

    spec = SIDES[side]
    return validate_recipe({
        "name": side, "output_dir": str(out), "seed": args.seed,
        "model": {"name": spec["model"]},
        "data": {"path": "unused", "input_fields": ["review"], "target_field": "stars_5", "prompt": "{review}",
                 "labels": LABELS},
        "train": {"head": "classifier", "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
                  "epochs": args.epochs, "batch_size": args.batch_size, "max_seq_length": 128, "logging_steps": 5,
                  **spec["train"]},
    })


def latency_ms(model, tokenizer, texts: list[str], batch_size: int) -> float:
    """Milliseconds per review to predict the head's label, ``batch_size`` reviews per forward pass."""
    from tunesmith.models.heads import encode, predict_proba

    rows = encode(tokenizer, texts)
    start = time.perf_counter()
    predict_proba(model, tokenizer, rows, batch_size=batch_size)
    return (time.perf_counter() - start) * 1000 / len(texts)


def run_side(side: str, train, held, args, out: Path) -> dict:
    from rich.console import Console

    from tunesmith.machine.memory import peak_rss, reset_peak_rss
    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.heads import encode, predict_proba
    from tunesmith.models.loading import load_tokenizer
    from tunesmith.records import Example
    from tunesmith.train.heads import train_classifier

    recipe = recipe_for(side, args, out)
    tokenizer = load_tokenizer(recipe.model.name)
    examples = [Example(f"r{i}", {"review": t}, label) for i, (t, label) in enumerate(train)]
    before = reset_peak_rss()
    start = time.perf_counter()
    result = train_classifier(recipe, examples, LABELS, tokenizer, pick_placement(), no_bar, Console(quiet=True))
    seconds = time.perf_counter() - start
    peak = peak_rss()
    model = result.model.eval()
    texts = [t for t, _ in held]
    probs = predict_proba(model, tokenizer, encode(tokenizer, texts), batch_size=32)
    hits = [LABELS[max(range(2), key=p.__getitem__)] == gold for p, (_, gold) in zip(probs, held, strict=True)]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"seconds": seconds, "peak_mb": (peak - before) / 2**20, "tokens": result.tokens,
            "accuracy": sum(hits) / len(hits), "trainable": trainable,
            "ms_one": latency_ms(model, tokenizer, texts[: args.latency_rows], 1),
            "ms_batch": latency_ms(model, tokenizer, texts, 32)}


@contextlib.contextmanager
def no_bar(_label, _steps):
    yield lambda *a, **k: None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=480)
    ap.add_argument("--held-out", type=int, default=200)
    ap.add_argument("--latency-rows", type=int, default=50, help="reviews answered one at a time")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sides", default=",".join(SIDES))
    args = ap.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"shared data not found at {SHARED} (set TUNESMITH_SHARED_DATA)")

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    train, held = load_reviews(args.examples, args.held_out, args.seed)
    print(f"NSMC polarity: {len(train)} training reviews, {len(held)} held out, {args.epochs} epoch(s), batch "
          f"{args.batch_size}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sides.split(","):
            load_before = os.getloadavg()[0]
            res = results[side] = run_side(side, train, held, args, Path(tmp))
            gc.collect()
            print(f"{side:>9}: train {res['seconds']:6.1f} s  {len(train) * args.epochs / res['seconds']:5.2f} reviews/s  "
                  f"{res['tokens'] / res['seconds']:6.1f} own tok/s  peak +{res['peak_mb']:5.0f} MB  "
                  f"trainable {res['trainable'] / 1e6:6.1f}M  accuracy {res['accuracy']:.1%}  "
                  f"latency {res['ms_one']:5.1f} ms one at a time, {res['ms_batch']:5.1f} ms in batches of 32  "
                  f"load avg {load_before:.1f}->{os.getloadavg()[0]:.1f}", flush=True)
    ref = results.get("llm-head")
    for side, res in results.items():
        if ref and side != "llm-head":
            print(f"{side} vs llm-head: training {ref['seconds'] / res['seconds']:.2f}x faster per review, "
                  f"peak memory ratio {res['peak_mb'] / ref['peak_mb']:.2f}, latency one at a time "
                  f"{ref['ms_one'] / res['ms_one']:.2f}x lower, accuracy {res['accuracy'] - ref['accuracy']:+.1%}")
    if "e5-full" in results and "e5-frozen" in results:
        full, frozen = results["e5-full"], results["e5-frozen"]
        print(f"e5-frozen vs e5-full: training {full['seconds'] / frozen['seconds']:.2f}x faster, peak memory "
              f"{full['peak_mb'] - frozen['peak_mb']:+.0f} MB less, accuracy {frozen['accuracy'] - full['accuracy']:+.1%}")


if __name__ == "__main__":
    main()
