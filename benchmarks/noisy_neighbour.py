"""One API key floods `tunesmith serve` while another sends ordinary requests: the ordinary key's latency beside the
flood against the same requests alone.

Starts `python -m tunesmith serve --engine E` as a user would, with two keys (``quiet`` and ``flood``) and the
per-key limits given (``--requests-per-key``, ``--tokens-per-minute-per-key``). Then, with the official client:

1. alone: the quiet key sends ``--requests`` chat requests one after another (real BANKING77 messages, greedy,
   ``--max-tokens``) and its latencies are recorded;
2. beside a flood: the flood key keeps ``--flood`` requests in flight from as many threads (each waits out a 429's
   ``retry-after`` and sends again; with ``--impatient`` it ignores ``retry-after`` and sends again at once), by
   volume (plain chat requests of ``--flood-tokens``) or by cost (constrained to a deep, wide, pattern-heavy JSON
   schema), and once it has started the quiet key sends the same requests again.

Prints the quiet key's p50 and p99 alone and beside the flood, their ratios (the goal: at most 1.5x), the flood's
answered requests and 429s, and the load average; ``--out`` writes it all as JSON.

    python benchmarks/noisy_neighbour.py --engine builtin --flood-kind volume --requests-per-key 4
    python benchmarks/noisy_neighbour.py --engine vllm --flood-kind cost --requests-per-key 4
    python benchmarks/noisy_neighbour.py --engine builtin --flood-kind volume --requests-per-key 1 --impatient
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
from pathlib import Path

import httpx2 as httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_engines import free_port, questions  # noqa: E402

MODEL = "smollm2-135m-instruct"
KEYS = {"quiet": "key-quiet", "flood": "key-flood"}


def costly_schema() -> dict:
    """Deep, wide and pattern-heavy, within the server's schema bounds."""
    leaf = {"type": "object", "additionalProperties": False, "required": [f"f{i}" for i in range(12)],
            "properties": {f"f{i}": {"type": "string", "pattern": "^(ab|cd|ef)+[0-9]{2,6}(x|yz)*[A-F]{1,3}$",
                                     "maxLength": 40} for i in range(12)}}
    node = leaf
    for depth in range(5):
        node = {"type": "object", "additionalProperties": False, "required": ["child", "tag"],
                "properties": {"child": {"anyOf": [node, leaf]}, "tag": {"enum": [f"t{depth}{j}" for j in range(30)]}}}
    return node


def start(engine: str, data_dir: Path, limits: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, TUNESMITH_API_KEYS=",".join(KEYS.values()))
    cmd = [sys.executable, "-m", "tunesmith", "serve", "--engine", engine, "--model", MODEL, "--port", str(port),
           "--data-dir", str(data_dir), "--no-python-graders", *limits]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(data_dir / "serve.log", "wb"))
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see {data_dir / 'serve.log'}")
        try:
            if httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {KEYS['quiet']}"}, timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit("the server did not answer in 15 minutes")


def quiet_run(url: str, texts: list[str], max_tokens: int) -> list[tuple[float, float]]:
    client = openai.OpenAI(base_url=url, api_key=KEYS["quiet"], max_retries=0, timeout=900)
    out = []
    for text in texts:
        t0 = time.perf_counter()
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                       max_tokens=max_tokens, temperature=0)
        out.append((t0, time.perf_counter()))
    return out


def durations(spans: list[tuple[float, float]]) -> list[float]:
    return [b - a for a, b in spans]


class Flood:
    """``threads`` threads of the flood key, each sending one request after another until stopped; after a 429 each
    waits out its ``retry-after``, or, ``impatient``, sends again at once."""

    def __init__(self, url: str, threads: int, kind: str, max_tokens: int, texts: list[str], impatient: bool = False):
        self.stop, self.limited, self.errors, self.impatient = threading.Event(), 0, [], impatient
        self.lock, self.spans = threading.Lock(), []  # (sent, answered) of each answered flood request
        client = openai.OpenAI(base_url=url, api_key=KEYS["flood"], max_retries=0, timeout=900)
        extra = {}
        if kind == "cost":
            extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "costly",
                                                                                "schema": costly_schema()}}}
        self.workers = [threading.Thread(target=self._work, args=(client, texts[i % len(texts)], max_tokens, extra),
                                         daemon=True) for i in range(threads)]
        for w in self.workers:
            w.start()

    def _work(self, client, text: str, max_tokens: int, extra: dict) -> None:
        while not self.stop.is_set():
            try:
                t0 = time.perf_counter()
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                               max_tokens=max_tokens, temperature=0.8, **extra)
                with self.lock:
                    self.spans.append((t0, time.perf_counter()))
            except openai.RateLimitError as exc:
                with self.lock:
                    self.limited += 1
                if not self.impatient:
                    self.stop.wait(float(exc.response.headers.get("retry-after-ms", "1000")) / 1000)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with self.lock:
                    self.errors.append(repr(exc)[:200])
                self.stop.wait(1)

    @property
    def answered(self) -> int:
        return len(self.spans)

    def end(self) -> None:
        self.stop.set()
        for w in self.workers:
            w.join(900)


def percentiles(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    return {"p50_s": statistics.median(ordered), "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "mean_s": statistics.fmean(ordered)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", choices=["builtin", "vllm"], default="builtin")
    ap.add_argument("--flood-kind", choices=["volume", "cost"], default="volume")
    ap.add_argument("--flood", type=int, default=200, help="requests the flood key keeps in flight (threads)")
    ap.add_argument("--flood-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--requests-per-key", type=int)
    ap.add_argument("--tokens-per-minute-per-key", type=int)
    ap.add_argument("--impatient", action="store_true", help="the flood ignores retry-after and retries at once")
    ap.add_argument("--out")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    limits = [a for flag, v in (("--requests-per-key", args.requests_per_key),
                                ("--tokens-per-minute-per-key", args.tokens_per_minute_per_key)) if v
              for a in (flag, str(v))]
    texts = questions(args.requests)
    with tempfile.TemporaryDirectory(prefix="noisy-") as tmp:
        proc, url = start(args.engine, Path(tmp), limits)
        try:
            quiet_run(url, texts[:3], args.max_tokens)  # warm-up
            alone_spans = quiet_run(url, texts, args.max_tokens)
            alone = durations(alone_spans)
            print(f"alone: {percentiles(alone)}", flush=True)
            flood = Flood(url, args.flood, args.flood_kind, args.flood_tokens, texts, impatient=args.impatient)
            time.sleep(5)  # the flood fills the engine first
            beside_spans = quiet_run(url, texts, args.max_tokens)
            beside = durations(beside_spans)
            flood.end()
        finally:
            proc.terminate()
            proc.wait(60)
    a, b = percentiles(alone), percentiles(beside)
    result = {"engine": args.engine, "flood_kind": args.flood_kind, "flood_in_flight": args.flood,
              "flood_impatient": args.impatient,
              "limits": limits, "requests": args.requests, "max_tokens": args.max_tokens, "alone": a, "beside": b,
              "p50_ratio": b["p50_s"] / a["p50_s"], "p99_ratio": b["p99_s"] / a["p99_s"],
              "flood_answered": flood.answered, "flood_429": flood.limited, "flood_errors": len(flood.errors),
              "flood_error_sample": flood.errors[:3], "load_average_end": os.getloadavg(),
              # every request's (sent, answered), seconds on one clock: which quiet requests a flood answer overlapped
              "quiet_spans": beside_spans, "flood_spans": sorted(flood.spans)}
    print(json.dumps(result, indent=2))
    retry = "retrying at once after a 429, ignoring retry-after" if args.impatient else "waiting out retry-after"
    print(f"\n{args.engine}, flood by {args.flood_kind} ({args.flood} in flight, {retry}, limits "
          f"{' '.join(limits) or 'none'}): "
          f"quiet key p50 {a['p50_s']:.2f} s alone -> {b['p50_s']:.2f} s ({result['p50_ratio']:.2f}x), "
          f"p99 {a['p99_s']:.2f} s -> {b['p99_s']:.2f} s ({result['p99_ratio']:.2f}x); flood answered "
          f"{flood.answered}, 429s {flood.limited}, errors {len(flood.errors)}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
