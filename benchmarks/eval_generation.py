"""Evaluation speed: tunesmith's batched evaluator vs a plain per-example ``model.generate`` loop.

Both run in this one process on the same prompts with the embedded SmolLM2-135M-Instruct, so
machine load affects both sides alike. Prints examples/second, the ratio, and whether the greedy
predictions are identical.

Part 1 (free generation): 200 Alpaca demo instructions whose reference answers are 10-40 tokens,
max_new_tokens=40. Part 2 (closed labels): 200 NSMC Korean reviews (40 per star), 1-5 stars:
label log-likelihood scoring vs batched generation vs the per-example loop, 3 new tokens.

    python benchmarks/eval_generation.py [--n 200] [--part both|alpaca|nsmc] [--batch-size 16]

Reads ../shared/data (or $TUNESMITH_SHARED_DATA); those files are not part of the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

SHARED = Path(
    os.environ.get("TUNESMITH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def per_example_loop(model, tok, prompts, max_new_tokens, eos):
    """What notebooks do: one prompt at a time, no padding."""
    import torch

    out = []
    for p in prompts:
        enc = tok(p, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            ids = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tok.pad_token_id,
            )
        out.append(tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return out


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def alpaca_prompts(tok, n, seed):
    rows = json.loads((SHARED / "instructions" / "llamafactory_alpaca_en_demo.json").read_text())
    rows = [r for r in rows if 10 <= len(tok(r["output"])["input_ids"]) <= 40]
    random.Random(seed).shuffle(rows)
    msgs = [
        [{"role": "user", "content": (r["instruction"] + ("\n\n" + r["input"] if r["input"] else ""))}]
        for r in rows[:n]
    ]
    return [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]


def nsmc_prompts(tok, n, seed):
    rows = [
        json.loads(line)
        for line in open(SHARED / "reviews_ko_nsmc" / "nsmc_reviews_shared.jsonl", encoding="utf-8")
    ]
    rng = random.Random(seed)
    picked = []
    for star in range(1, 6):
        pool = [r for r in rows if r["stars_5"] == star]
        picked += rng.sample(pool, n // 5)
    rng.shuffle(picked)
    labels = ["1", "2", "3", "4", "5"]
    msgs = [
        [
            {"role": "system", "content": "Rate the movie review from 1 to 5 stars."},
            {
                "role": "user",
                "content": f"Review: {r['review']}\n\nAnswer with exactly one of these labels: "
                + ", ".join(labels)
                + ".",
            },
        ]
        for r in picked
    ]
    prompts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
    return prompts, [str(r["stars_5"]) for r in picked], labels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--part", choices=["both", "alpaca", "nsmc"], default="both")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # results appear as they come, also in a log file

    import torch

    from tunesmith.data.formats.messages import end_of_turn
    from tunesmith.generation import generate_greedy, score_labels, stop_ids
    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.loading import load_model, load_tokenizer
    from tunesmith.scoring.metrics import parse_label

    torch.manual_seed(0)
    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct", pick_placement())
    eos = stop_ids(tok, model)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )

    if args.part in ("both", "alpaca"):
        prompts = alpaca_prompts(tok, args.n, args.seed)
        ours, t_ours = timed(lambda: generate_greedy(model, tok, prompts, 40, args.batch_size))
        peer, t_peer = timed(lambda: per_example_loop(model, tok, prompts, 40, eos))
        same = sum(a == b for a, b in zip(ours, peer, strict=True))
        print(f"\n[alpaca] {len(prompts)} prompts, max_new_tokens=40")
        print(
            f"  tunesmith batched (batch {args.batch_size}, length-sorted): {t_ours:7.1f} s  "
            f"{len(prompts) / t_ours:6.2f} ex/s"
        )
        print(
            f"  per-example model.generate loop:            {t_peer:7.1f} s  "
            f"{len(prompts) / t_peer:6.2f} ex/s"
        )
        print(f"  speed-up: {t_peer / t_ours:.2f}x   identical predictions: {same}/{len(prompts)}")
        for a, b in [(a, b) for a, b in zip(ours, peer, strict=True) if a != b][:3]:
            print(f"    differs: {a[:70]!r} vs {b[:70]!r}")

    if args.part in ("both", "nsmc"):
        prompts, gold, labels = nsmc_prompts(tok, args.n, args.seed)
        suffix = end_of_turn(tok)
        scores, t_score = timed(
            lambda: score_labels(model, tok, prompts, labels, suffix, max(1, args.batch_size // 2))
        )
        scored = [labels[j] for j in scores.argmax(axis=1)]
        gen, t_gen = timed(lambda: generate_greedy(model, tok, prompts, 3, args.batch_size))
        peer, t_peer = timed(lambda: per_example_loop(model, tok, prompts, 3, eos))

        def acc(pred):
            return sum(p == g for p, g in zip(pred, gold, strict=True)) / len(gold)

        parsed, parsed_peer = [parse_label(o, labels) for o in gen], [parse_label(o, labels) for o in peer]
        print(f"\n[nsmc stars] {len(prompts)} prompts, 5 labels")
        for name, t, pred in (
            ("tunesmith label scoring", t_score, scored),
            ("tunesmith batched generation (3 tokens)", t_gen, parsed),
            ("per-example model.generate loop (3 tokens)", t_peer, parsed_peer),
        ):
            unp = sum(p is None for p in pred)
            print(
                f"  {name:<44} {t:7.1f} s  {len(prompts) / t:6.2f} ex/s  accuracy {acc(pred):.1%}  "
                f"unparseable {unp}"
            )
        print(
            f"  speed-up vs loop: label scoring {t_peer / t_score:.2f}x, "
            f"batched generation {t_peer / t_gen:.2f}x; "
            f"identical generations: {sum(a == b for a, b in zip(gen, peer, strict=True))}/{len(prompts)}"
        )


if __name__ == "__main__":
    main()
