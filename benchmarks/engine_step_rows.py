"""What one decoding step of the builtin engine's model costs with 1, 2, 4 and 8 rows on this machine: the price
another key's row puts on a light key's step (the fair share gives each key a row of the step while a light key is
present).

Two ways in one run, on the same model and cache: transformers' own ``nn.Linear`` (PyTorch's ``linear``), and the
engine's way, its linear layers turned weight-first for a few rows (``tunesmith.models.few_rows``). The embedded model
in process, a KV cache of ``--context`` tokens, ``--steps`` decoding steps of one new token per row, ms a step for
each batch size, the ratio to one row, and the engine's way against the plain one.

``--other-team`` then measures the engine's way again beside an idle second thread that once ran torch: first one
that ran it on one intra-op thread (what the server's lanes do, ``tunesmith.serve.lanes.torch_threads``), then one that
ran it on torch's default threads (what they did: that thread keeps an OpenMP team of its own while it lives).

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
    ap.add_argument("--other-team", action="store_true", help="the engine's way beside an idle thread that ran torch")
    args = ap.parse_args()

    import torch

    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.few_rows import weight_first_for_few_rows
    from tunesmith.models.loading import load_model

    print(f"load average at start: {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}")
    model = load_model(args.model, pick_placement())
    model.eval()
    ways = {"plain": step_times(model, args), "engine": {}}
    print(f"weight-first linear layers: {weight_first_for_few_rows(model)}")
    ways["engine"] = step_times(model, args)
    for way, times in ways.items():
        for rows, ms in times.items():
            print(f"{way:>6} {rows} row(s): {ms:6.1f} ms a step  ({ms / times[1]:.2f}x one row)")
    for rows in ways["plain"]:
        print(f"{rows} row(s): engine's way {ways['plain'][rows] / ways['engine'][rows]:.2f}x the plain linear's speed")
    if args.other_team:
        for threads in (1, None):
            ways[f"beside a thread of {threads or 'default'} torch threads"] = beside_other_thread(model, args, threads)
        for way, times in list(ways.items())[2:]:
            print(f"engine, {way}: " + ", ".join(f"{rows} row(s) {ms:.1f} ms" for rows, ms in times.items()))
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    print(json.dumps({"context": args.context, "ms_per_step": ways}))


def beside_other_thread(model, args, threads: int | None) -> dict[int, float]:
    """:func:`step_times` while another thread, alive and idle, has run a little torch work on ``threads`` intra-op
    threads (None: torch's default)."""
    import threading

    import torch

    ran, done = threading.Event(), threading.Event()

    def other():
        if threads:
            torch.set_num_threads(threads)
        x = torch.randn(512, 576, requires_grad=True)
        (x @ torch.randn(1536, 576).t()).sum().backward()
        ran.set()
        done.wait()

    threading.Thread(target=other, daemon=True).start()
    ran.wait()
    try:
        return step_times(model, args)
    finally:
        done.set()


def step_times(model, args) -> dict[int, float]:
    """ms a decoding step for 1, 2, 4 and 8 rows, each warmed first."""
    times = {}
    for rows in (1, 2, 4, 8):
        step_ms(model, rows, args.context, 5)  # warm
        times[rows] = round(step_ms(model, rows, args.context, args.steps), 1)
    return times


if __name__ == "__main__":
    main()
