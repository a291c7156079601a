"""One key alone on `tunesmith serve --engine vllm`'s engine: what the fair share costs it.

A key alone fills vLLM's batch, but each of its rows that may be paused (tunesmith.serve.engines.vllm.sharing) is
streamed from vLLM with its token ids, even when its caller does not stream, so that it can be paused. This runs the
same rows both ways on one vLLM (the embedded SmolLM2-135M-Instruct, the engine without the HTTP front), rounds
alternating: ``shared`` as served now, and ``plain`` with every row sent as one plain request (the engine before the
fair share). Rows are chat requests (BANKING77 messages), sampled at temperature 0.8 as the noisy-neighbour flood
sends them, not streamed. Prints each round's tokens/s and the median ratio shared / plain.

    python benchmarks/vllm_fair_share.py --rows 64 --max-tokens 64 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_engines import questions  # noqa: E402

MODEL = "smollm2-135m-instruct"


async def one_round(engine, prompts: list[list[int]], max_tokens: int) -> tuple[int, float]:
    """All rows at once, as one key: (completion tokens, seconds)."""
    from tunesmith.serve.engines.interface import GenParams

    t0 = time.perf_counter()
    requests = [engine.submit(MODEL, ids, [GenParams(max_tokens, temperature=0.8)], tenant="one") for ids in prompts]
    answers = await asyncio.gather(*(r.results() for r in requests))
    return sum(a[0].completion_tokens for a in answers), time.perf_counter() - t0


def main() -> None:
    from tunesmith.serve.engines.vllm import engine as vllm_engine

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fair-share-") as tmp:
        engine = vllm_engine.VllmEngine(MODEL, {}, Path(tmp) / "vllm")
        try:
            prompts = [engine.chat_prompt_ids([{"role": "user", "content": q}]) for q in questions(args.rows)]
            asyncio.run(one_round(engine, prompts[:4], 8))  # warm-up
            rates: dict[str, list[float]] = {"shared": [], "plain": []}
            for r in range(args.rounds):
                for way in ("shared", "plain") if r % 2 == 0 else ("plain", "shared"):
                    with mock.patch.object(vllm_engine, "may_pause", (lambda *a: False) if way == "plain"
                                           else vllm_engine.may_pause):
                        tokens, seconds = asyncio.run(one_round(engine, prompts, args.max_tokens))
                    rates[way].append(tokens / seconds)
                    print(f"round {r + 1} {way}: {tokens} tokens in {seconds:.2f} s, {tokens / seconds:.1f} tokens/s",
                          flush=True)
        finally:
            engine.close()
    shared, plain = statistics.median(rates["shared"]), statistics.median(rates["plain"])
    print(f"\none key alone, {args.rows} rows x {args.max_tokens} tokens: shared {shared:.1f} tokens/s, plain "
          f"{plain:.1f} tokens/s, ratio {shared / plain:.3f}; load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
