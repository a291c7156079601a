"""Local-model generation for synthetic data: batched vs one call at a time, in one run.

The embedded SmolLM2-135M-Instruct answers the same prompts (greedy, fixed max tokens) through
``LocalChatClient`` with batch size B and with batch size 1; prints completion tokens/second
for both and the ratio.

    python benchmarks/synth_local.py [--prompts 32] [--batch 16] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tunesmith.clients.calls import ChatRequest
from tunesmith.clients.chat import LocalChatClient

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "alpaca_seed_tasks.jsonl"


def prompts(n: int) -> list[str]:
    rows = [json.loads(x) for x in DATA.read_text(encoding="utf-8").splitlines()[:n]]
    return [r["instruction"] for r in rows]


def timed(client: LocalChatClient, reqs: list[ChatRequest]) -> tuple[float, int, list[str]]:
    out: dict[int, object] = {}
    t0 = time.perf_counter()
    client.run(reqs, lambda i, r: out.__setitem__(i, r))
    dt = time.perf_counter() - t0
    replies = [out[i] for i in range(len(reqs))]
    return dt, sum(r.completion_tokens for r in replies), [r.text for r in replies]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    reqs = [ChatRequest.chat([{"role": "user", "content": p}], temperature=0.0, max_tokens=args.max_tokens)
            for p in prompts(args.prompts)]
    batched = LocalChatClient(batch_size=args.batch)
    single = LocalChatClient(batch_size=1)
    single._loaded = batched._load()  # same weights, loaded once
    timed(batched, reqs[:2])  # warm-up
    b_s, b_tok, _ = timed(batched, reqs)
    s_s, s_tok, _ = timed(single, reqs)
    print(f"{len(reqs)} prompts, greedy, up to {args.max_tokens} new tokens")
    print(f"one call at a time: {s_tok} tokens in {s_s:.1f} s = {s_tok / s_s:.1f} tok/s")
    print(f"batched (batch {args.batch}): {b_tok} tokens in {b_s:.1f} s = {b_tok / b_s:.1f} tok/s")
    print(f"ratio (batched / one at a time, tokens per second): {(b_tok / b_s) / (s_tok / s_s):.1f}x")


if __name__ == "__main__":
    main()
