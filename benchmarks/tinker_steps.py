"""Four tenants' LoRA steps on one resident base: fused into one step, against the same steps one after another.

The trainer the Tinker API runs (:class:`tunesmith.serve.tinker.trainer.Trainer`), in this process: four tenants'
runs (LoRA rank ``--rank``) on one base. A step: every tenant's ``forward_backward`` of ``--batch`` BANKING77 examples
(``cross_entropy`` on the answer), then every tenant's ``optim_step``, two ways on runs of their own:

- **fused**: the four calls as one step (:meth:`Trainer.forward_backward_many`, what ``--tinker-fused-steps`` runs:
  the four tenants' rows padded into shared passes, each row through its own run's adapter);
- **one after another**: each tenant's call alone (what the server runs by default, and what a queue of steps does).

Before the timing, the loss check: from the same seeds, two fused steps' losses against the losses of the same calls
one after another (each tenant's own; the second step's after the first's update), their largest relative difference
printed (on a GPU the base is in bf16).
Then ``--steps`` steps each way in alternating blocks. No HTTP: the API's own cost is ``benchmarks/tinker_api.py``'s.
Prints the machine, load average, the model, tokens a step (real and padded), tokens per second each way and
their ratio, and peak memory (a GPU's ``max_memory_allocated``, else this process's peak RSS); JSON with ``--out``.

    python benchmarks/tinker_steps.py                     # the embedded model on this machine
    python benchmarks/tinker_steps.py --model "random:llama-3.2-1b?tokenizer=PATH"   # a GPU machine's 1B
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fencing import alternating, machine, stats  # noqa: E402

from tests.conftest import banking_rows  # noqa: E402

LABELS = ("card_arrival", "pin_blocked", "age_limit", "exchange_rate")
TENANTS = 4


def tenant_data(tokenizer, batch: int) -> list[list]:
    """Each tenant's ``batch`` examples (wire datums: prompt then label, the label weighted), distinct messages."""
    import numpy as np

    from tunesmith.serve.tinker.wire import Datum

    rows = banking_rows(LABELS, -(-TENANTS * batch // len(LABELS)))
    data = []
    for t in range(TENANTS):
        out = []
        for row in rows[t::TENANTS][:batch]:
            prompt = tokenizer.encode(f"Classify: {row['text']}\nLabel:")
            tokens = prompt + tokenizer.encode(" " + row["category"]) + [tokenizer.eos_token_id]
            weights = [0.0] * len(prompt) + [1.0] * (len(tokens) - len(prompt))
            out.append(Datum(tokens[:-1], {"target_tokens": np.array(tokens[1:]),
                                           "weights": np.array(weights[1:], dtype=np.float32)}))
        data.append(out)
    return data


def fused_step(trainer, names: list[str], data, lr: float) -> tuple[float, list[float]]:
    from tunesmith.serve.tinker.trainer import Call

    t0 = time.perf_counter()
    answers = trainer.forward_backward_many([Call(n, d, "cross_entropy", {}, True) for n, d in zip(names, data,
                                                                                                   strict=True)])
    for n in names:
        trainer.optim_step(n, {"learning_rate": lr})
    sync()
    return time.perf_counter() - t0, [a[1]["loss:sum"] for a in answers]


def apart_step(trainer, names: list[str], data, lr: float) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    losses = [trainer.forward_backward(n, d, "cross_entropy", {}, True)[1]["loss:sum"]
              for n, d in zip(names, data, strict=True)]
    for n in names:
        trainer.optim_step(n, {"learning_rate": lr})
    sync()
    return time.perf_counter() - t0, losses


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gb() -> float:
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=8, help="examples of each tenant's forward_backward")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--block", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from tunesmith.serve.tinker.trainer import Trainer

    load = os.getloadavg()
    print(f"machine: {machine()}  load average at start: {load[0]:.2f}  model: {args.model}")
    trainer = Trainer(args.model)
    fused = [f"fused-{t}" for t in range(TENANTS)]
    apart = [f"apart-{t}" for t in range(TENANTS)]
    for t in range(TENANTS):  # the same seed for a tenant's two runs: the same start
        trainer.create(fused[t], args.rank, t)
        trainer.create(apart[t], args.rank, t)
    data = tenant_data(trainer.tokenizer, args.batch)
    real = sum(len(d.tokens) for rows in data for d in rows)
    padded = sum(len(p) * len(p[0][2].tokens) for p in _passes(data))

    # the loss check: two steps each way from the same start (the second step's losses follow the first's update)
    fused_losses = [fused_step(trainer, fused, data, args.lr)[1] for _ in range(2)]
    apart_losses = [apart_step(trainer, apart, data, args.lr)[1] for _ in range(2)]
    diff = max(abs(a - b) / max(1.0, abs(b)) for f, p in zip(fused_losses, apart_losses, strict=True)
               for a, b in zip(f, p, strict=True))
    print(f"loss check (two steps, per tenant): fused {[round(x, 4) for x in fused_losses[1]]}  one after another "
          f"{[round(x, 4) for x in apart_losses[1]]}  largest relative difference {diff:.2e}")

    times = alternating({"fused": lambda: fused_step(trainer, fused, data, args.lr)[0],
                         "one_after_another": lambda: apart_step(trainer, apart, data, args.lr)[0]},
                        args.steps, args.block)
    ways = {name: {**stats(t), "tokens_per_s": round(real * len(t) / sum(t), 1)} for name, t in times.items()}
    ratio = ways["fused"]["tokens_per_s"] / ways["one_after_another"]["tokens_per_s"]
    result = {"machine": machine(), "model": args.model, "load_start": round(load[0], 2),
              "load_end": round(os.getloadavg()[0], 2), "tenants": TENANTS, "batch": args.batch, "rank": args.rank,
              "steps": args.steps, "tokens_a_step": real, "padded_tokens_fused_step": padded, "ways": ways,
              "speedup": round(ratio, 3), "loss_check_max_rel_diff": diff, "peak_gb": peak_gb()}
    print(f"\n{TENANTS} tenants x {args.batch} examples a step ({real} tokens; {padded} padded in the fused step's "
          f"passes), {args.steps} steps each way:")
    for name, way in ways.items():
        print(f"  {name:18s} {way['tokens_per_s']:9.1f} tokens/s  (median step {way['p50_ms']:.0f} ms)")
    print(f"  fused / one after another: {ratio:.2f}x (goal >= 1.3x); peak memory {result['peak_gb']} GB; "
          f"load average at end: {result['load_end']}")
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


def _passes(data):
    from tunesmith.serve.tinker.trainer import passes

    return passes([(i, k, d) for i, rows in enumerate(data) for k, d in enumerate(rows)])


if __name__ == "__main__":
    main()
