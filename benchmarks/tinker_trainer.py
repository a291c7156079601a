"""The Tinker trainer in process: four tenants' LoRA steps fused into one against the same steps one after another
and against peft's mixed-adapter batch, and an RL round of sampling on the server's inference engine against a
per-sequence ``generate`` loop.

The trainer the Tinker API runs (:class:`tunesmith.serve.tinker.trainer.Trainer`), in this process, without HTTP (the
API's own cost is ``benchmarks/tinker_api.py``'s; through the API, ``benchmarks/tinker_sampling.py``). It needs only
torch, transformers and peft, so a GPU machine's kit runs it (``scripts/gpu_run.sh tinker``).

**Sampling** (first, on the base alone): a round of ``--prompts`` BANKING77 messages x ``--group`` sequences x
``--max-tokens`` tokens at temperature 1 (``stop=[]``: every sequence that long), ``--sampling-rounds`` rounds each
way in alternating blocks: the server's inference engine (:class:`tunesmith.generation.ContinuousBatch`, whose rows
the API's sample calls become) against transformers' ``generate`` for one sequence at a time on the same weights (the
peer).

**Steps**: four tenants' runs (LoRA rank ``--rank``) on one base. A step: every tenant's ``forward_backward`` of the
same number of BANKING77 examples (``cross_entropy`` on the answer), then every tenant's ``optim_step``, at each
size of ``--batch`` (2, 4 and 8 examples a call by default), three ways on runs of their own: **fused**, the four calls
as one step (:meth:`Trainer.forward_backward_many`, what the server runs when the calls wait together: one pass, each
row through its own run's adapter, one batched low-rank product per layer), **one after another** (each call alone,
``--no-tinker-fused-steps``), and the peer, **peft's mixed-adapter batch** (the same rows in one pass through peft's
``adapter_names`` forward, which gathers and scatters each adapter's rows at every layer). Before the timing, the
loss check: from the same seeds, two steps each way (each tenant's own losses; the second step's after the first's
update), the largest relative difference from one after another printed (on a GPU the base is in bf16). Then
``--steps`` steps each way in alternating blocks.

Prints the machine, load average, the model, tokens per second of each way and the ratios, and peak memory (a GPU's
``max_memory_allocated``, else this process's peak RSS); JSON with ``--out``.

    python benchmarks/tinker_trainer.py                     # the embedded model on this machine
    python benchmarks/tinker_trainer.py --model "random:llama-3.2-1b?tokenizer=PATH"   # a GPU machine's 1B
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import alternating, counting, machine, stats  # noqa: E402

LABELS = ("card_arrival", "pin_blocked", "age_limit", "exchange_rate")
TENANTS = 4
EXAMPLES = REPO / "examples" / "data" / "banking77_10intents.csv"  # real BANKING77 rows, in the repository


def banking_rows(per_label: int) -> list[dict]:
    """``per_label`` BANKING77 rows of each of :data:`LABELS` (read here: a GPU machine's kit has no test packages)."""
    import csv

    out: dict[str, list[dict]] = {label: [] for label in LABELS}
    with open(EXAMPLES, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if len(out.get(row["category"], [None] * per_label)) < per_label:
                out[row["category"]].append(row)
    return [r for label in LABELS for r in out[label]]


def tenant_data(tokenizer, batch: int) -> list[list]:
    """Each tenant's ``batch`` examples (wire datums: prompt then label, the label weighted), distinct messages."""
    import numpy as np

    from tunesmith.serve.tinker.wire import Datum

    rows = banking_rows(-(-TENANTS * batch // len(LABELS)))
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


def prompts(tokenizer, n: int) -> list[list[int]]:
    """``n`` BANKING77 messages as prompts asking for their intent."""
    return [tokenizer.encode(f"Message: {row['text']}\nWhat does the customer want?") for row in banking_rows(n)[:n]]


def engine_round(model, tokenizer, rounds: list[list[int]], group: int, max_tokens: int) -> tuple[float, int]:
    """The server's inference engine in process (continuous batching, what a Tinker sample's rows run on): every row
    of the round queued at once (up to 64 in flight), each token's logprob recorded: (seconds, tokens generated)."""
    from tunesmith.generation import ContinuousBatch, GenParams, Row

    params = GenParams(max_tokens=max_tokens, temperature=1.0, stop_token_ids=())  # stop=[]: nothing ends a row
    batch = ContinuousBatch(model, tokenizer, max_rows=64, max_cache_tokens=1 << 20)
    rows = [Row(p, params, logprobs=0) for p in rounds for _ in range(group)]
    t0 = time.perf_counter()
    for row in rows:
        batch.add(row)
    while batch.busy:
        batch.step()
    sync()
    return time.perf_counter() - t0, sum(len(r.generated) for r in rows)


def generate_round(model, rounds: list[list[int]], group: int, max_tokens: int) -> tuple[float, int]:
    """The peer: one ``generate`` per sequence, each token's logprob from the raw logits."""
    import torch

    t0 = time.perf_counter()
    tokens = 0
    with torch.no_grad():
        for p in rounds:
            ids = torch.tensor([p], device=model.device)
            for _ in range(group):
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                     temperature=1.0, top_k=0, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                     output_logits=True, return_dict_in_generate=True, pad_token_id=0)
                new = out.sequences[0, len(p):]
                [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, new.tolist(), strict=True)]
                tokens += len(new)
    sync()
    return time.perf_counter() - t0, tokens


def sampling(trainer, args) -> dict:
    """The sampling ways, timed on the base (before any run exists): each way's stats and tokens per second."""
    trainer.load()
    rounds = prompts(trainer.tokenizer, args.prompts)
    model, tokenizer = trainer.plain, trainer.tokenizer
    engine_round(model, tokenizer, rounds[:1], 2, 4), generate_round(model, rounds[:1], 1, 4)  # warm both
    ways, counted = counting({
        "engine": lambda: engine_round(model, tokenizer, rounds, args.group, args.max_tokens),
        "generate_loop": lambda: generate_round(trainer.plain, rounds, args.group, args.max_tokens)})
    times = alternating(ways, args.sampling_rounds, 1)
    per_round = args.prompts * args.group * args.max_tokens
    for name, counts in counted.items():
        assert all(n == per_round for n in counts), f"{name} generated {counts}, not {per_round} a round"
    return {name: {**stats(t), "tokens_per_s": round(per_round * len(t) / sum(t), 1)} for name, t in times.items()}


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


@contextmanager
def peft_forward(trainer):
    """peft's own forward on the trainer's LoRA layers for a while (the trainer's, ``stacked``, set aside)."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in trainer.model.modules() if isinstance(m, LoraLayer)]
    kept = [m.__dict__.pop("forward") for m in layers]
    try:
        yield
    finally:
        for m, forward in zip(layers, kept, strict=True):
            m.forward = forward


def peft_mixed_step(trainer, names: list[str], data, lr: float) -> tuple[float, list[float]]:
    """The peer: the same step as one padded pass through peft's mixed-adapter batch (``adapter_names``: each
    adapter's rows gathered and scattered back at every layer), the same loss (cross-entropy weighted by the datums'
    weights, summed), one backward, each run's AdamW step."""
    import numpy as np
    import torch

    t0 = time.perf_counter()
    rows = [(n, d) for n, ds in zip(names, data, strict=True) for d in ds]
    width = max(len(d.tokens) for _, d in rows)
    device = trainer.plain.get_input_embeddings().weight.device
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (_, d) in enumerate(rows):
        ids[r, :len(d.tokens)] = torch.tensor(d.tokens)
        mask[r, :len(d.tokens)] = 1
    ids, mask = ids.to(device), mask.to(device)
    targets = torch.tensor(np.concatenate([d.inputs["target_tokens"] for _, d in rows]), device=device)
    weights = torch.tensor(np.concatenate([d.inputs["weights"] for _, d in rows]), device=device)
    with peft_forward(trainer):
        logits = trainer.model(input_ids=ids, attention_mask=mask, adapter_names=[n for n, _ in rows]).logits
    chosen = torch.log_softmax(logits[mask.bool()].float(), -1).gather(1, targets[:, None])[:, 0]
    per_row = (-(chosen * weights)).split([len(d.tokens) for _, d in rows])
    losses = {n: 0.0 for n in names}
    for (n, _), loss in zip(rows, per_row, strict=True):
        losses[n] += float(loss.detach().sum())
    torch.stack([loss.sum() for loss in per_row]).sum().backward()
    for n in names:
        trainer.runs[n].pending += 1
        trainer.optim_step(n, {"learning_rate": lr})
    sync()
    return time.perf_counter() - t0, [losses[n] for n in names]


STEPS = {"fused": fused_step, "one_after_another": apart_step, "peft_mixed_batch": peft_mixed_step}


def steps(trainer, batch: int, args) -> dict:
    """The four tenants' steps with calls of ``batch`` examples, every way on runs of its own from the same seeds: the
    loss check (two steps each way), then ``--steps`` steps each way in alternating blocks."""
    runs = {way: [f"{way}-{batch}-{t}" for t in range(TENANTS)] for way in STEPS}
    for t in range(TENANTS):  # the same seed for a tenant's runs: the same start
        for names in runs.values():
            trainer.create(names[t], args.rank, t)
    data = tenant_data(trainer.tokenizer, batch)
    real = sum(len(d.tokens) for rows in data for d in rows)
    padded = sum(len(p) * len(p[0][2].tokens) for p in _passes(data))
    # the loss check: two steps each way from the same start (the second step's losses follow the first's update)
    losses = {way: [fn(trainer, runs[way], data, args.lr)[1] for _ in range(2)] for way, fn in STEPS.items()}
    diff = {way: max(abs(a - b) / max(1.0, abs(b)) for f, p in zip(losses[way], losses["one_after_another"],
                                                                    strict=True) for a, b in zip(f, p, strict=True))
            for way in ("fused", "peft_mixed_batch")}
    print(f"\n{TENANTS} tenants x {batch} examples a call: loss check (two steps, per tenant, the second): "
          + "  ".join(f"{way} {[round(x, 4) for x in ls[1]]}" for way, ls in losses.items())
          + f"; largest relative difference from one after another: fused {diff['fused']:.2e}, "
            f"peft's mixed batch {diff['peft_mixed_batch']:.2e}")
    times = alternating({way: partial(lambda fn, names: fn(trainer, names, data, args.lr)[0], fn, runs[way])
                         for way, fn in STEPS.items()}, args.steps, args.block)
    ways = {name: {**stats(t), "tokens_per_s": round(real * len(t) / sum(t), 1)} for name, t in times.items()}
    base = ways["one_after_another"]["tokens_per_s"]
    for name, way in ways.items():
        print(f"  {name:18s} {way['tokens_per_s']:9.1f} tokens/s  (median step {way['p50_ms']:.0f} ms)  "
              f"{way['tokens_per_s'] / base:.2f}x")
    ratio = ways["fused"]["tokens_per_s"] / base
    print(f"  fused / one after another: {ratio:.2f}x (goal >= 1.2x); fused / peft's mixed batch: "
          f"{ways['fused']['tokens_per_s'] / ways['peft_mixed_batch']['tokens_per_s']:.2f}x  ({real} tokens a step, "
          f"{padded} padded in the fused step's passes)")
    for names in runs.values():
        for name in names:
            trainer.drop(name)
    return {"batch": batch, "tokens_a_step": real, "padded_tokens_fused_step": padded, "ways": ways,
            "speedup": round(ratio, 3), "loss_check_max_rel_diff": diff}


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
    ap.add_argument("--batch", default="2,4,8", help="examples of each tenant's forward_backward (a list: the steps "
                    "part at each)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--block", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--prompts", type=int, default=4, help="sampling: prompts a round")
    ap.add_argument("--group", type=int, default=8, help="sampling: sequences after each prompt")
    ap.add_argument("--max-tokens", type=int, default=32, help="sampling: tokens of each sequence")
    ap.add_argument("--sampling-rounds", type=int, default=2, help="sampling: rounds each way (0: no sampling part)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from tunesmith.serve.tinker.trainer import Trainer

    load = os.getloadavg()
    print(f"machine: {machine()}  load average at start: {load[0]:.2f}  model: {args.model}")
    trainer = Trainer(args.model)
    sampled = sampling(trainer, args) if args.sampling_rounds else {}
    if sampled:
        sample_ratio = sampled["engine"]["tokens_per_s"] / sampled["generate_loop"]["tokens_per_s"]
        print(f"\nSampling a round ({args.prompts} prompts x {args.group} sequences x {args.max_tokens} tokens), "
              f"{args.sampling_rounds} rounds each way:")
        for name, way in sampled.items():
            print(f"  {name:18s} {way['tokens_per_s']:9.1f} tokens/s  (median round {way['p50_ms'] / 1000:.1f} s)")
        print(f"  engine / one sequence at a time: {sample_ratio:.2f}x\n")
    sizes = [steps(trainer, int(b), args) for b in args.batch.split(",")]
    result = {"machine": machine(), "model": args.model, "load_start": round(load[0], 2),
              "load_end": round(os.getloadavg()[0], 2), "tenants": TENANTS, "rank": args.rank, "steps": args.steps,
              "sizes": sizes, "peak_gb": peak_gb(),
              "sampling": sampled and {"prompts": args.prompts, "group": args.group, "max_tokens": args.max_tokens,
                                       "ways": sampled, "speedup": round(sample_ratio, 2)}}
    print(f"\npeak memory {result['peak_gb']} GB; load average at end: {result['load_end']}")
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


def _passes(data):
    from tunesmith.serve.tinker.trainer import passes

    return passes([(i, k, d) for i, rows in enumerate(data) for k, d in enumerate(rows)])


if __name__ == "__main__":
    main()
