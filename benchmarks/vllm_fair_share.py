"""One key alone on `tunesmith serve --engine vllm`'s engine: its throughput with the fair share against the engine as
it was before it (git revision ``--before``), on one vLLM.

With the fair share every row is streamed from vLLM with its token ids (so that it can be paused, and so that its
first token says its prompt is prefilled), and a key's new prompts go to vLLM a prefill budget at a time; before it,
each row was one plain request, streamed only when its caller streamed. A key alone must still fill the batch at the
same speed. Both engines drive the same vLLM (the embedded SmolLM2-135M-Instruct, without the HTTP front), rounds
alternating; rows are chat requests (BANKING77 messages) sampled at temperature 0.8 and not streamed, as the
noisy-neighbour flood sends them. Prints each round's tokens/s and the ratio of the medians (now / before).

    python benchmarks/vllm_fair_share.py --rows 64 --max-tokens 64 --rounds 4
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_engines import questions  # noqa: E402

MODEL = "smollm2-135m-instruct"
REPO = Path(__file__).resolve().parents[1]
ENGINE_PATH = "src/tunesmith/serve/engines/vllm/engine.py"
BEFORE = "1b57725"  # the last revision before the fair share on the vLLM engine


def engine_before(rev: str, now, folder: Path):
    """The vLLM engine class as it was at ``rev``, on the vLLM server ``now`` started (its state copied, its own
    bookkeeping fresh)."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{ENGINE_PATH}"], capture_output=True, text=True,
                            check=True).stdout
    path = folder / "engine_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("engine_before", path)
    module = sys.modules["engine_before"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    before = object.__new__(module.VllmEngine)
    before.__dict__.update(now.__dict__)
    before.tasks, before.in_flight_of, before._clients = set(), Counter(), {}
    return before


async def one_round(engine, prompts: list[list[int]], max_tokens: int) -> tuple[int, float]:
    """All rows at once, as one key: (completion tokens, seconds)."""
    from tunesmith.serve.engines.interface import GenParams

    t0 = time.perf_counter()
    requests = [engine.submit(MODEL, ids, [GenParams(max_tokens, temperature=0.8)], tenant="one") for ids in prompts]
    answers = await asyncio.gather(*(r.results() for r in requests))
    return sum(a[0].completion_tokens for a in answers), time.perf_counter() - t0


def main() -> None:
    from tunesmith.serve.engines.vllm.engine import VllmEngine

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--before", default=BEFORE, help="the git revision of the engine to compare with")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fair-share-") as tmp:
        now = VllmEngine(MODEL, {}, Path(tmp) / "vllm")
        try:
            engines = {"now": now, "before": engine_before(args.before, now, Path(tmp))}
            prompts = [now.chat_prompt_ids([{"role": "user", "content": q}]) for q in questions(args.rows)]
            for engine in engines.values():
                asyncio.run(one_round(engine, prompts[:4], 8))  # warm-up
            rates: dict[str, list[float]] = {"now": [], "before": []}
            for r in range(args.rounds):
                for way in ("now", "before") if r % 2 == 0 else ("before", "now"):
                    tokens, seconds = asyncio.run(one_round(engines[way], prompts, args.max_tokens))
                    rates[way].append(tokens / seconds)
                    print(f"round {r + 1} {way}: {tokens} tokens in {seconds:.2f} s, {tokens / seconds:.1f} tokens/s",
                          flush=True)
        finally:
            now.close()
    a, b = statistics.median(rates["now"]), statistics.median(rates["before"])
    print(f"\none key alone, {args.rows} rows x {args.max_tokens} tokens: now {a:.1f} tokens/s, before ({args.before}) "
          f"{b:.1f} tokens/s, ratio {a / b:.3f}; load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
