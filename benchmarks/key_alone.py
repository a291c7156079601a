"""What the tenant bounds cost a key alone: `tunesmith serve` as it is against the same server before the bounds.

Starts `python -m tunesmith serve --engine E` (the embedded SmolLM2-135M-Instruct, two keys, default settings) from
this tree and from the tree at ``--before`` (a git ref checked out into a temporary worktree, run on the same Python
and packages), one after the other, alternating over ``--rounds``. On each, key A alone:

1. one request at a time (``--requests`` short chats, greedy): the latency every bound adds to a request (the key
   checked before the body, the planning lane, the edge, the step's share);
2. ``--clients`` requests in flight at once for ``--seconds`` (chats of ``--max-tokens``, temperature 0.8): the
   throughput a key alone gets, which the step's share must leave whole (the goal: within 10% of before).

Prints each side's p50 latency and tokens/s per round, the medians and their ratios, and the load average.

    python benchmarks/key_alone.py --engine builtin --rounds 2
    python benchmarks/key_alone.py --engine vllm --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from noisy_neighbour import KEYS, MODEL  # noqa: E402
from serving_engines import free_port, questions  # noqa: E402
from timing import worktree  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BEFORE = "098f0e9"  # the last commit before per-key bounds by default (lanes, step shares, held refusals)


@contextmanager
def server(src: Path, engine: str):
    """`tunesmith serve` from the package under ``src``; yields its /v1 URL."""
    import httpx2 as httpx

    with tempfile.TemporaryDirectory(prefix="key-alone-data-") as data:
        port = free_port()
        env = dict(os.environ, PYTHONPATH=str(src), TUNESMITH_API_KEYS=",".join(KEYS.values()))
        log = open(Path(data) / "serve.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", "--engine", engine, "--model", MODEL,
                                 "--port", str(port), "--data-dir", data, "--no-python-graders"], env=env,
                                stdout=subprocess.DEVNULL, stderr=log)
        url = f"http://127.0.0.1:{port}/v1"
        try:
            deadline = time.monotonic() + 900
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"the server from {src} exited: {(Path(data) / 'serve.log').read_text()[-2000:]}")
                try:
                    if httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {KEYS['quiet']}"},
                                 timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not answer in 15 minutes")
                time.sleep(1)
            yield url
        finally:
            proc.terminate()
            proc.wait(60)
            log.close()


def one_at_a_time(client, texts: list[str]) -> float:
    """The median seconds of short greedy chats sent one after another."""
    spans = []
    for text in texts:
        t0 = time.perf_counter()
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=16,
                                       temperature=0)
        spans.append(time.perf_counter() - t0)
    return statistics.median(spans)


def throughput(client, texts: list[str], clients: int, seconds: float, max_tokens: int) -> float:
    """Generated tokens a second with ``clients`` requests in flight for ``seconds`` (requests that end after the
    window still count their tokens; the window is measured to the last of them)."""
    stop, lock, tokens = threading.Event(), threading.Lock(), [0]

    def work(i: int) -> None:
        while not stop.is_set():
            r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": texts[i % len(texts)]}],
                                               max_tokens=max_tokens, temperature=0.8)
            with lock:
                tokens[0] += r.usage.completion_tokens

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(600)
    return tokens[0] / (time.perf_counter() - t0)


def measure(src: Path, engine: str, args) -> dict:
    texts = questions(max(args.requests, args.clients))
    with server(src, engine) as url:
        client = openai.OpenAI(base_url=url, api_key=KEYS["flood"], max_retries=0, timeout=900)
        one_at_a_time(client, texts[:3])  # warm-up
        latency = one_at_a_time(client, texts[: args.requests])
        tps = throughput(client, texts, args.clients, args.seconds, args.max_tokens)
    return {"p50_s": latency, "tokens_per_s": tps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", choices=["builtin", "vllm"], default="builtin")
    ap.add_argument("--before", default=BEFORE, help="the git ref of the server before the bounds")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    rounds: dict[str, list[dict]] = {"now": [], "before": []}
    with worktree(args.before) as old:
        for r in range(args.rounds):
            order = [("now", REPO / "src"), ("before", old / "src")]
            for name, src in order if r % 2 == 0 else order[::-1]:
                result = measure(src, args.engine, args)
                rounds[name].append(result)
                print(f"round {r + 1} {name}: p50 {result['p50_s']:.3f} s, {result['tokens_per_s']:.1f} tokens/s",
                      flush=True)
    med = {name: {k: statistics.median(x[k] for x in rs) for k in ("p50_s", "tokens_per_s")}
           for name, rs in rounds.items()}
    summary = {"engine": args.engine, "before": args.before, "clients": args.clients, "rounds": rounds,
               "median": med, "latency_ratio": med["now"]["p50_s"] / med["before"]["p50_s"],
               "throughput_ratio": med["now"]["tokens_per_s"] / med["before"]["tokens_per_s"],
               "load_average_end": os.getloadavg()}
    print(json.dumps(summary, indent=2))
    print(f"\n{args.engine}, one key alone: one at a time p50 {med['before']['p50_s']:.3f} s before -> "
          f"{med['now']['p50_s']:.3f} s now ({summary['latency_ratio']:.2f}x); {args.clients} in flight "
          f"{med['before']['tokens_per_s']:.1f} -> {med['now']['tokens_per_s']:.1f} tokens/s "
          f"({summary['throughput_ratio']:.2f}x)")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
