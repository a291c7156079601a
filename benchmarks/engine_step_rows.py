"""What one decoding step of the builtin engine's model costs with 1, 2 and 4 rows on this machine: the price another
key's row puts on a light key's step (the fair share gives each key a row of the step; on a CPU a step of two rows may
cost much more than a step of one).

The embedded model in process, a KV cache of ``--context`` tokens, ``--steps`` decoding steps of one new token per
row, ms a step for each batch size; the ratios to one row. The peer is the one-row step (a key alone).

    python benchmarks/engine_step_rows.py
"""

from __future__ import annotations

import argparse
import json
import os
import time


def step_ms(model, rows: int, context: int, steps: int) -> float:
    """Milliseconds a decoding step of ``rows`` rows takes after a ``context``-token prefill."""
    import torch

    ids = torch.randint(5, 1000, (rows, context))
    mask = torch.ones(rows, context, dtype=torch.long)
    with torch.inference_mode():
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1).past_key_values
        t0 = time.perf_counter()
        for s in range(steps):
            mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long)], 1)
            cache = model(input_ids=torch.randint(5, 1000, (rows, 1)), attention_mask=mask,
                          position_ids=torch.full((rows, 1), context + s), past_key_values=cache, use_cache=True,
                          logits_to_keep=1).past_key_values
    return (time.perf_counter() - t0) / steps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--context", type=int, default=100)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()

    import torch

    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.loading import load_model

    print(f"load average at start: {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}")
    model = load_model(args.model, pick_placement())
    model.eval()
    times = {}
    for rows in (1, 2, 4):
        step_ms(model, rows, args.context, 5)  # warm
        times[rows] = round(step_ms(model, rows, args.context, args.steps), 1)
    for rows, ms in times.items():
        print(f"{rows} row(s): {ms:6.1f} ms a step  ({ms / times[1]:.2f}x one row)")
    print(json.dumps({"context": args.context, "ms_per_step": times}))


if __name__ == "__main__":
    main()
