"""Continuous batching vs the static-batching engine it replaced vs one request at a time.

All three engines serve the embedded SmolLM2-135M-Instruct on CPU and are driven the same way,
in-process from one asyncio loop (no HTTP, so only scheduling differs):

1. Head-of-line blocking: one long request (max_tokens 512) starts, 0.2 s later 30 short ones
   (16 tokens) arrive; p50/p99 latency of the short ones.
2. Throughput: 50 clients x 32 tokens at once; aggregate output tokens/s.

Engines: ``continuous`` (tunesmith.serve.engines.builtin, rows join and leave the batch at every step),
``static`` (benchmarks/peers/static_batching_engine.py: requests arriving together run as one
``model.generate`` batch to its end) and ``one at a time`` (the continuous engine with max batch 1).

    python benchmarks/serve_continuous_batching.py [--short 30] [--long-tokens 512] [--clients 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers.static_batching_engine import Engine as StaticEngine  # noqa: E402
from peers.static_batching_engine import GenParams as StaticParams  # noqa: E402

from tunesmith.serve.engines.builtin import Engine
from tunesmith.serve.engines.interface import GenParams  # noqa: E402

MODEL = "smollm2-135m-instruct"
DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "alpaca_seed_tasks.jsonl"
LONG_PROMPT = "Write a detailed, step by step guide to opening a bank account, with at least twenty steps."


async def generate(engine, ids: list[int], max_tokens: int) -> tuple[float, int]:
    """Seconds until the answer is complete, and its completion tokens, through either engine's API."""
    t0 = time.perf_counter()
    if isinstance(engine, StaticEngine):
        gen = await asyncio.wrap_future(engine.submit(engine.base_name, ids, StaticParams(max_tokens, 0.0)))
    else:
        [gen] = await engine.submit(engine.base_name, ids, [GenParams(max_tokens, 0.0)]).results()
    return time.perf_counter() - t0, gen.completion_tokens


async def head_of_line(engine, long_ids, short_ids, long_tokens: int) -> dict:
    long_task = asyncio.ensure_future(generate(engine, long_ids, long_tokens))
    await asyncio.sleep(0.2)
    shorts = await asyncio.gather(*(generate(engine, ids, 16) for ids in short_ids))
    long_s, long_n = await long_task
    lat = sorted(s for s, _ in shorts)
    return {"p50": statistics.median(lat), "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))], "long_s": long_s,
            "long_tokens": long_n}


async def throughput(engine, ids_list, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(generate(engine, ids, max_tokens) for ids in ids_list))
    wall = time.perf_counter() - t0
    tokens = sum(n for _, n in results)
    return {"wall": wall, "tokens": tokens, "tok_s": tokens / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--short", type=int, default=30)
    ap.add_argument("--long-tokens", type=int, default=512)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64, help="max batch of the batching engines")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs, torch threads from the default")
    rows = [json.loads(x) for x in DATA.read_text(encoding="utf-8").splitlines()]
    engines = {"continuous": lambda: Engine(MODEL, max_batch=args.batch, wait_ms=20),
               "static": lambda: StaticEngine(MODEL, max_batch=args.batch, wait_ms=20),
               "one at a time": lambda: Engine(MODEL, max_batch=1, wait_ms=0)}
    results = {}
    for name, make in engines.items():
        engine = make()
        chat = [engine.chat_prompt_ids([{"role": "user", "content": rows[i % len(rows)]["instruction"]}])
                for i in range(max(args.short, args.clients))]
        long_ids = engine.chat_prompt_ids([{"role": "user", "content": LONG_PROMPT}])

        async def run(engine=engine, chat=chat, long_ids=long_ids):
            await generate(engine, chat[0], 4)  # warm-up
            return (await head_of_line(engine, long_ids, chat[: args.short], args.long_tokens),
                    await throughput(engine, chat[: args.clients], args.tokens))

        results[name] = asyncio.run(run())
        engine.close()
        hol, tp = results[name]
        print(f"{name:>14}: {args.short} short requests behind a {hol['long_tokens']}-token one: p50 {hol['p50']:.2f} s, "
              f"p99 {hol['p99']:.2f} s (long one {hol['long_s']:.1f} s); {args.clients} x {args.tokens} tokens: "
              f"{tp['tokens']} tokens in {tp['wall']:.1f} s = {tp['tok_s']:.1f} tok/s", flush=True)
    cont, static, single = (results[k] for k in engines)
    print(f"short-request p50: static / continuous = {static[0]['p50'] / cont[0]['p50']:.1f}x, "
          f"one at a time / continuous = {single[0]['p50'] / cont[0]['p50']:.1f}x")
    print(f"short-request p99: static / continuous = {static[0]['p99'] / cont[0]['p99']:.1f}x, "
          f"one at a time / continuous = {single[0]['p99'] / cont[0]['p99']:.1f}x")
    print(f"throughput: continuous / one at a time = {cont[1]['tok_s'] / single[1]['tok_s']:.1f}x, "
          f"continuous / static = {cont[1]['tok_s'] / static[1]['tok_s']:.1f}x")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
