"""Concurrent chat clients against `tunesmith serve`: batched engine vs one request at a time.

Starts the server in-process on 127.0.0.1 with the embedded SmolLM2-135M-Instruct, then sends
the same chat requests from C concurrent clients (the official `openai` client, one thread
each) twice: with request batching (max batch B) and with batching off (max batch 1, i.e.
requests served one after another). Prints errors, p50/p99 latency and aggregate output
tokens/s for both, and the ratio.

    python benchmarks/serve_concurrency.py [--clients 50] [--max-tokens 32] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from tunesmith.serve.app import ServeSettings, create_app
from tunesmith.serve.engines.builtin import Engine
from tunesmith.serve.launch import serve_in_thread

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "alpaca_seed_tasks.jsonl"


def serve(engine, data_dir):
    srv, root = serve_in_thread(create_app(ServeSettings(model=engine.base_name, data_dir=data_dir), engine), "error")
    return srv, f"{root}/v1"


def run_clients(url: str, model: str, prompts: list[str], max_tokens: int) -> dict:
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=600)

    def one(p):
        t0 = time.perf_counter()
        try:
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": p}],
                                               max_tokens=max_tokens, temperature=0)
            return time.perf_counter() - t0, r.usage.completion_tokens, None
        except Exception as exc:  # noqa: BLE001 - counted and reported
            return time.perf_counter() - t0, 0, repr(exc)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {"wall_s": wall, "errors": sum(r[2] is not None for r in results), "tokens": tokens,
            "tok_per_s": tokens / wall, "p50_s": statistics.median(lat), "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    rows = [json.loads(x) for x in DATA.read_text(encoding="utf-8").splitlines()]
    prompts = [rows[i % len(rows)]["instruction"] for i in range(args.clients)]
    import tempfile

    data_dir = Path(tempfile.mkdtemp())
    engine = Engine("smollm2-135m-instruct", max_batch=args.batch, wait_ms=20)
    srv, url = serve(engine, data_dir)
    run_clients(url, engine.base_name, prompts[:2], 4)  # warm-up
    batched = run_clients(url, engine.base_name, prompts, args.max_tokens)
    engine.batch.max_rows = 1  # the same server, batching off: requests are served one after another
    single = run_clients(url, engine.base_name, prompts, args.max_tokens)
    srv.should_exit = True
    print(f"{args.clients} concurrent chat clients, greedy, max_tokens {args.max_tokens}, SmolLM2-135M on CPU")
    for name, r in (("one at a time", single), (f"batched (max batch {args.batch})", batched)):
        print(f"{name:>24}: errors {r['errors']}, {r['tokens']} tokens in {r['wall_s']:.1f} s = {r['tok_per_s']:.1f} tok/s,"
              f" p50 {r['p50_s']:.1f} s, p99 {r['p99_s']:.1f} s")
    print(f"ratio (batched / one at a time, aggregate output tokens/s): {batched['tok_per_s'] / single['tok_per_s']:.1f}x")


if __name__ == "__main__":
    main()
