"""A batch of chat completions against the same requests sent one by one and 16 at a time, on one `tunesmith serve`.

Starts `python -m tunesmith serve --engine E` as a user would, then sends ``--requests`` chat requests (real
BANKING77 messages, cycled; greedy, ``--max-tokens``) three ways with the official client: one after another, from
16 threads at once, and as one batch (``files.create(purpose="batch")`` + ``batches.create``, polled until done).
Prints generated tokens/s of each, the ratios, and how many batch answers equal the direct ones (greedy: all
should); ``--out`` writes the numbers as JSON.

    python benchmarks/batch_throughput.py --engine builtin --requests 1000
    python benchmarks/batch_throughput.py --engine vllm --requests 1000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from noisy_neighbour import start  # noqa: E402
from serving_engines import questions  # noqa: E402

MODEL = "smollm2-135m-instruct"


def one(client, text: str, max_tokens: int):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                       max_tokens=max_tokens, temperature=0)
    return r.choices[0].message.content, r.usage.completion_tokens


def timed_direct(client, texts: list[str], max_tokens: int, threads: int) -> tuple[float, int, list[str]]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda t: one(client, t, max_tokens), texts))
    return time.perf_counter() - t0, sum(n for _, n in results), [a for a, _ in results]


def timed_batch(client, texts: list[str], max_tokens: int) -> tuple[float, int, list[str]]:
    lines = "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": MODEL, "messages": [{"role": "user", "content": t}], "max_tokens": max_tokens, "temperature": 0}})
        + "\n" for i, t in enumerate(texts)).encode()
    t0 = time.perf_counter()
    f = client.files.create(file=("batch.jsonl", lines), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
        print(f"\r  batch: {batch.request_counts.completed}/{batch.request_counts.total}", end="", flush=True)
    seconds = time.perf_counter() - t0
    print()
    answers: list[str] = [""] * len(texts)
    tokens = 0
    for line in client.files.content(batch.output_file_id).read().splitlines():
        doc = json.loads(line)
        body = doc["response"]["body"]
        answers[int(doc["custom_id"][1:])] = body["choices"][0]["message"]["content"]
        tokens += body["usage"]["completion_tokens"]
    return seconds, tokens, answers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", choices=["builtin", "vllm"], default="builtin")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    base = questions(200)
    texts = [base[i % len(base)] for i in range(args.requests)]
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as tmp:
        proc, url = start(args.engine, Path(tmp), [])
        try:
            client = openai.OpenAI(base_url=url, api_key="key-quiet", max_retries=0, timeout=3600)
            one(client, texts[0], args.max_tokens)  # warm-up
            rows = {}
            for name, run in (("one by one", lambda: timed_direct(client, texts, args.max_tokens, 1)),
                              ("16 at a time", lambda: timed_direct(client, texts, args.max_tokens, 16)),
                              ("batch", lambda: timed_batch(client, texts, args.max_tokens))):
                seconds, tokens, answers = run()
                rows[name] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "answers": answers}
                print(f"{name:>12}: {seconds:7.1f} s, {tokens:,} tokens, {tokens / seconds:7.1f} tokens/s", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    same = sum(a == b for a, b in zip(rows["batch"]["answers"], rows["one by one"]["answers"], strict=True))
    result = {"engine": args.engine, "requests": args.requests, "max_tokens": args.max_tokens,
              **{k: {m: v for m, v in r.items() if m != "answers"} for k, r in rows.items()},
              "batch_vs_one_by_one": rows["batch"]["tokens_per_s"] / rows["one by one"]["tokens_per_s"],
              "batch_vs_16": rows["batch"]["tokens_per_s"] / rows["16 at a time"]["tokens_per_s"],
              "identical_answers": same, "load_average_end": os.getloadavg()}
    print(f"batch {result['batch_vs_one_by_one']:.1f}x one by one, {result['batch_vs_16']:.2f}x 16 at a time; "
          f"{same}/{args.requests} batch answers identical to the direct greedy ones")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
