"""What drawing each sampled row's next token costs, and what it does to a 64-row sampled decoding step: the
engine's draw (one uniform number a row, its cumulative sum inverted: ``tunesmith.generation.sampling.draw``) against
``torch.multinomial`` per row with the row's own generator (the engine's way before) and transformers' ``generate``
way (one ``torch.multinomial`` over the whole batch, no seed per row), in one run on the same probabilities.

Part 1: ``--rows`` rows of the embedded model's vocabulary, the draw alone. Part 2: ``--rows`` sampled rows
(temperature 1) decoding ``--steps`` steps on the engine's continuous batch, the engine's draw against
``torch.multinomial`` per row; ms a step and the ratio.

    python benchmarks/row_draws.py
"""

from __future__ import annotations

import argparse
import json
import os
import time


def timed(fn, repeat: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat * 1000


def draws(vocab: int, rows: int, repeat: int) -> dict[str, float]:
    """ms to draw one token for each of ``rows`` rows, three ways."""
    import torch

    from tunesmith.generation.sampling import draw

    probs = torch.softmax(torch.randn(rows, vocab) * 3, -1)
    rngs = [torch.Generator().manual_seed(i) for i in range(rows)]
    return {
        "engine (inverse cumulative sum, a generator a row)": timed(
            lambda: [draw(probs[i], rngs[i]) for i in range(rows)], repeat),
        "torch.multinomial, a generator a row": timed(
            lambda: [int(torch.multinomial(probs[i], 1, generator=rngs[i])) for i in range(rows)], repeat),
        "torch.multinomial over the batch (transformers' generate)": timed(
            lambda: torch.multinomial(probs, 1).squeeze(1).tolist(), repeat),
    }


def step_ms(model, tok, rows: int, steps: int) -> float:
    """ms a decoding step of ``rows`` sampled rows on the engine's continuous batch."""
    from tunesmith.generation import ContinuousBatch, GenParams, Row

    ids = tok("my card has not arrived yet, what should I do?", add_special_tokens=False)["input_ids"]
    batch = ContinuousBatch(model, tok, max_rows=rows)
    for i in range(rows):
        batch.add(Row(ids, GenParams(steps + 2, temperature=1.0, seed=i, stop_token_ids=())))
    batch.step()  # the prefill
    t0 = time.perf_counter()
    for _ in range(steps):
        batch.step()
    ms = (time.perf_counter() - t0) / steps * 1000
    while batch.busy:
        batch.step()
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    import torch

    from tunesmith.generation import sampling
    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.loading import load_model, load_tokenizer

    print(f"load average at start: {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}")
    tok = load_tokenizer(args.model)
    model = load_model(args.model, pick_placement()).eval()
    vocab = model.config.vocab_size
    alone = draws(vocab, args.rows, 5)
    ours = next(iter(alone.values()))
    for way, ms in alone.items():
        print(f"draw of {args.rows} rows over {vocab} tokens, {way}: {ms:.1f} ms ({ms / ours:.2f}x the engine's)")
    engine_way = step_ms(model, tok, args.rows, args.steps)
    own = sampling.draw
    sampling.draw = lambda probs, rng: int(torch.multinomial(probs, 1, generator=rng))
    try:
        multinomial_way = step_ms(model, tok, args.rows, args.steps)
    finally:
        sampling.draw = own
    print(f"a {args.rows}-row sampled decoding step: engine's draw {engine_way:.0f} ms, torch.multinomial a row "
          f"{multinomial_way:.0f} ms: {multinomial_way / engine_way:.2f}x faster")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    print(json.dumps({"rows": args.rows, "vocab": vocab, "draw_ms": alone,
                      "step_ms": {"engine": engine_way, "multinomial_per_row": multinomial_way}}))


if __name__ == "__main__":
    main()
