"""Training an encoder head with attention dropout 0 (tunesmith's default) vs transformers' defaults (0.1).

BERT-style encoders ship with ``attention_probs_dropout_prob: 0.1``. With dropout on the attention
probabilities PyTorch's fused scaled-dot-product kernel cannot run, so every layer builds, drops out and
back-propagates a [batch, heads, length, length] probability tensor. tunesmith's heads train with
``train.attention_dropout: 0.0`` (the fused kernel) unless a recipe asks otherwise.

Both sides train the same head on the same rows through ``train_head`` exactly as ``tunesmith run`` calls
it, for the same number of steps from the same seed; they differ only in ``train.attention_dropout``:

- ``tunesmith``: ``attention_dropout: 0.0`` (the default);
- ``transformers-defaults``: ``attention_dropout: null`` (the model's own 0.1, as a plain
  ``AutoModelForQuestionAnswering`` / ``Trainer`` script trains it).

Tasks: ``span`` (extractive QA on KorQuAD 1.0 questions, 384-token windows, e5's span head: the
korquad_extractive recipe's e5-span arm) and ``classifier`` (NSMC 1-star / 5-star reviews, short texts:
the nsmc_binary e5-head arm). Reported per side: non-padding tokens/s, peak resident memory above the
level before training (Linux VmHWM, reset before each side), and the mean training loss of the last
steps (the two sides differ only in dropout, so their losses should be close, not equal).

    python benchmarks/attention_dropout.py --task span --steps 24
    python benchmarks/attention_dropout.py --task classifier --steps 40
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import tempfile
from pathlib import Path

SHARED = Path(
    os.environ.get("TUNESMITH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
MODEL = "multilingual-e5-small"
SIDES = {"tunesmith": 0.0, "transformers-defaults": None}


def korquad_examples(n: int, seed: int) -> list:
    """``n`` KorQuAD 1.0 questions (context, question, first answer) drawn at random."""
    from tunesmith.records import Example

    doc = json.loads((SHARED / "korquad" / "korquad_v1_dev_shared.json").read_text(encoding="utf-8"))
    rows = [(p["context"], qa["question"], qa["answers"][0]) for art in doc["data"] for p in art["paragraphs"]
            for qa in p["qas"]]
    random.Random(seed).shuffle(rows)
    return [Example(f"q{i}", {"context": c, "question": q}, a["text"],
                    meta={"answers": [a["text"]], "answer_start": a["answer_start"]})
            for i, (c, q, a) in enumerate(rows[:n])]


def nsmc_examples(n: int, seed: int) -> list:
    """``n`` distinct 1-star / 5-star NSMC reviews drawn at random."""
    from tunesmith.records import Example

    rows = {}
    with open(SHARED / "reviews_ko_nsmc" / "nsmc_reviews_shared.jsonl", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if str(r["stars_5"]) in ("1", "5") and r["review"].strip():
                rows[r["review"]] = str(r["stars_5"])
    pairs = sorted(rows.items())
    random.Random(seed).shuffle(pairs)
    return [Example(f"r{i}", {"review": t}, label) for i, (t, label) in enumerate(pairs[:n])]


def recipe_for(task: str, dropout: float | None, args, out: Path):
    import tunesmith.kinds  # noqa: F401 - registers the task kinds the schema checks
    import tunesmith.train  # noqa: F401 - registers the training methods (their shapes and trainers)
    from tunesmith.config import validate_recipe

    data = ({"path": "unused", "input_fields": ["context", "question"], "target_field": "answers", "task": "qa",
             "prompt": "{context}\n\n{question}"} if task == "span" else
            {"path": "unused", "input_fields": ["review"], "target_field": "stars_5", "prompt": "{review}",
             "labels": ["1", "5"]})
    return validate_recipe({
        "name": f"{task}-{dropout}", "output_dir": str(out), "seed": args.seed, "model": {"name": MODEL}, "data": data,
        "train": {"head": task, "adapter": "full", "freeze_embeddings": True, "learning_rate": 1e-4,
                  "batch_size": args.batch_size, "max_steps": args.steps, "logging_steps": 1,
                  "max_seq_length": 384 if task == "span" else 128, "attention_dropout": dropout},
    })


def run_side(task: str, dropout: float | None, examples: list, args, out: Path) -> dict:
    from rich.console import Console

    from tunesmith.machine.memory import peak_rss, reset_peak_rss
    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.loading import load_tokenizer
    from tunesmith.train.heads import TRAINING, train_classifier, train_head

    recipe = recipe_for(task, dropout, args, out)
    tokenizer = load_tokenizer(MODEL)
    console = Console(quiet=True)
    before = reset_peak_rss()
    if task == "span":
        result = train_head(TRAINING["span"], recipe, examples, tokenizer, pick_placement(), no_bar, console, False, None)
    else:
        result = train_classifier(recipe, examples, ["1", "5"], tokenizer, pick_placement(), no_bar, console)
    losses = [r["train_loss"] for r in result.rows if r.get("train_loss") is not None]
    tail = losses[-max(1, len(losses) // 3):]
    return {"seconds": result.seconds, "tokens": result.tokens, "peak_mb": (peak_rss() - before) / 2**20,
            "loss": sum(tail) / len(tail), "steps": len(losses)}


@contextlib.contextmanager
def no_bar(_label, _steps):
    yield lambda *a, **k: None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=["span", "classifier"], default="span")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"shared data not found at {SHARED} (set TUNESMITH_SHARED_DATA)")

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    n = args.steps * args.batch_size
    examples = korquad_examples(n, args.seed) if args.task == "span" else nsmc_examples(n, args.seed)
    print(f"{MODEL}, {args.task} head, {len(examples)} examples, {args.steps} steps of {args.batch_size}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}",
          flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side, dropout in SIDES.items():
            load_before = os.getloadavg()[0]
            res = results[side] = run_side(args.task, dropout, examples, args, Path(tmp) / side)
            gc.collect()
            print(f"{side:>21} (attention dropout {dropout if dropout is not None else 'model default'}): "
                  f"{res['steps']} steps in {res['seconds']:6.1f} s  {res['tokens'] / res['seconds']:6.1f} tok/s  "
                  f"peak +{res['peak_mb']:5.0f} MB  loss (last third) {res['loss']:.3f}  "
                  f"load avg {load_before:.1f}->{os.getloadavg()[0]:.1f}", flush=True)
    ours, peer = results["tunesmith"], results["transformers-defaults"]
    print(f"tunesmith vs transformers defaults: {ours['tokens'] / ours['seconds'] / (peer['tokens'] / peer['seconds']):.2f}x "
          f"tokens/s, peak memory {ours['peak_mb'] - peer['peak_mb']:+.0f} MB, loss {ours['loss'] - peer['loss']:+.3f}")


if __name__ == "__main__":
    main()
