"""LLM-call throughput: tunesmith's concurrent cached client vs one call at a time.

Against a local OpenAI-compatible dummy server with a fixed latency per call, in one run:
  1. one request at a time (what a notebook loop does), on the first N_SEQ requests;
  2. tunesmith's client, concurrency 16, all requests, with injected 429s (each request is
     refused once before it succeeds, so every call is retried);
  3. the same job again: every reply comes from the SQLite cache, zero calls.
Prints requests/second for each and the ratios.

    python benchmarks/synth_calls.py [--requests 500] [--latency 0.2] [--sequential 500]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from tunesmith.clients.calls import ChatRequest
from tunesmith.clients.chat import OpenAIChatClient
from tunesmith.clients.retry import RetryPolicy
from tunesmith.synth.cache import CallCache, run_calls

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for the test suite's dummy server

from tests.chat_server import DummyChatServer  # noqa: E402


def requests(n: int) -> list[ChatRequest]:
    return [ChatRequest.chat([{"role": "user", "content": f"Paraphrase question {i}"}], seed=0) for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--sequential", type=int, default=500, help="how many requests the one-at-a-time loop makes")
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    reqs = requests(args.requests)
    tmp = Path(tempfile.mkdtemp())
    retry = RetryPolicy(max_retries=5, base_s=0.05, cap_s=1.0)

    with DummyChatServer(lambda m: "ok " + m[-1]["content"], latency_s=args.latency) as server:
        import openai

        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        t0 = time.perf_counter()
        for r in reqs[: args.sequential]:
            client.chat.completions.create(model="dummy", messages=r.message_dicts(), max_tokens=r.max_tokens, seed=r.seed)
        seq = time.perf_counter() - t0
        seq_rate = args.sequential / seq

    with DummyChatServer(lambda m: "ok " + m[-1]["content"], latency_s=args.latency, fail_first=1) as server:
        ours = OpenAIChatClient(server.base_url, "dummy", api_key_env=None, concurrency=args.concurrency, retry=retry)
        cache = CallCache(tmp / "calls.sqlite")
        t0 = time.perf_counter()
        results, stats = run_calls(ours, cache, reqs)
        conc = time.perf_counter() - t0
        ok = sum(1 for r in results if hasattr(r, "texts"))
        refused = sum(server.attempts.values()) - server.total_completed
        t0 = time.perf_counter()
        _, stats2 = run_calls(ours, cache, reqs)
        rerun = time.perf_counter() - t0
        rerun_calls = server.total_completed - ok

    print(f"dummy server latency {args.latency * 1000:.0f} ms/call, {args.requests} distinct requests")
    print(f"one at a time (openai client loop): {args.sequential} calls in {seq:.1f} s = {seq_rate:.1f} req/s"
          f"  -> {args.requests} would take {args.requests / seq_rate:.0f} s")
    print(f"tunesmith, concurrency {args.concurrency}: {ok}/{args.requests} ok in {conc:.2f} s = {args.requests / conc:.1f} req/s;"
          f" {refused} injected 429s, {stats.retries} retries, {stats.failures} failures")
    print(f"rerun from cache: {rerun:.3f} s, {rerun_calls} calls made, {stats2.cache_hits} cache hits")
    print(f"ratio (tunesmith / one at a time, requests per second): {(args.requests / conc) / seq_rate:.1f}x")


if __name__ == "__main__":
    main()
