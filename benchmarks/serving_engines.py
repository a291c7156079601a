"""`tunesmith serve` on its built-in engine vs `--engine vllm` (vLLM's CPU build behind the same API).

Each engine is started as a user starts it (`python -m tunesmith serve --engine E`, one at a time), then gets the
same chat requests (real BANKING77 messages, temperature 0): one at a time, then all at once from ``--concurrency``
clients. Prints per engine: start-up (process start to /v1/models answering), tokens/s and p50/p99 latency in both
phases, CPU seconds per generated token and peak resident memory of the serving processes (the jobs worker left
out; vLLM's processes summed), and how many greedy answers are identical across engines. An adapter
(``--adapter NAME=PATH``) adds a second set of requests to it.

``--front-vs-direct`` measures what tunesmith's API in front of vLLM costs instead: one `tunesmith serve --engine
vllm`, and the same chat requests sent to it and straight to the vLLM process it started (its private socket and
key, read from that process as its own user can), alternating which goes first: one at a time request by
request, and ``--concurrency`` at once round by round (``--rounds`` passes over the questions). Prints tokens/s of
each, the ratio front/direct, identical answers and the front process's CPU per request.

    python benchmarks/serving_engines.py [--questions 20] [--max-tokens 64] [--concurrency 16] [--out result.json]
    python benchmarks/serving_engines.py --front-vs-direct [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import openai
import psutil

REPO = Path(__file__).resolve().parents[1]
CSV = REPO / "examples" / "data" / "banking77_10intents.csv"
SYSTEM = "You are a bank's support assistant. Answer the customer briefly."


def questions(n: int) -> list[str]:
    import csv

    with open(CSV, newline="", encoding="utf-8") as fh:
        return [row["text"] for _, row in zip(range(n), csv.DictReader(fh), strict=False)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """One `tunesmith serve` process: started, timed to its first /v1/models answer, its tree's CPU and memory."""

    def __init__(self, engine: str, model: str, adapters: list[str], data_dir: Path, extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None):
        self.port = free_port()
        cmd = [sys.executable, "-m", "tunesmith", "serve", "--engine", engine, "--model", model, "--port",
               str(self.port), "--data-dir", str(data_dir), *[a for x in adapters for a in ("--adapter", x)], *extra]
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(data_dir / "serve.log", "wb"),
                                     env=None if env is None else {**os.environ, **env})
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.peak_rss = 0
        self.sampling = True
        self.startup_s = self._wait()
        threading.Thread(target=self._sample, daemon=True).start()

    def _wait(self) -> float:
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}; see its serve.log")
            try:
                if httpx.get(self.ready_url(), timeout=2).status_code == 200:
                    return time.perf_counter() - self.t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)

    def ready_url(self) -> str:
        """What answers 200 once the server serves: /v1/models (a server with keys: override with /health)."""
        return f"{self.url}/models"

    def processes(self) -> list[psutil.Process]:
        """The server and its children (vLLM's), not the idle jobs worker."""
        root = psutil.Process(self.proc.pid)
        return [p for p in [root, *root.children(recursive=True)]
                if "tunesmith.serve.jobs.worker" not in " ".join(p.cmdline())]

    def cpu_s(self) -> float:
        total = 0.0
        for p in self.processes():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def rss(self) -> int:
        """Resident bytes of the server and its children now (the jobs worker left out)."""
        return sum(p.memory_info().rss for p in self.processes())

    def _sample(self) -> None:
        while self.sampling:
            try:
                self.peak_rss = max(self.peak_rss, self.rss())
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.5)

    def stop(self) -> None:
        self.sampling = False
        self.proc.terminate()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def ask(url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int,
        client: openai.OpenAI | None = None) -> dict:
    """All prompts from ``concurrency`` clients; answers in prompt order, latency and token counts."""
    client = client or openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=1800)

    def one(q: str):
        t0 = time.perf_counter()
        r = client.chat.completions.create(model=model, temperature=0, max_tokens=max_tokens, messages=[
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
        return time.perf_counter() - t0, r.usage.completion_tokens, r.choices[0].message.content

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {"wall_s": round(wall, 2), "tokens": tokens, "tok_per_s": round(tokens / wall, 2),
            "p50_s": round(statistics.median(lat), 2), "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2),
            "answers": [r[2] for r in results]}


def measure(engine: str, args, prompts: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        server = Served(engine, args.model, args.adapter or [], Path(tmp))
        try:
            out = {"startup_s": round(server.startup_s, 1), "load_before": os.getloadavg()[0]}
            models = [args.model, *[a.split("=", 1)[0] for a in args.adapter or []]]
            ask(server.url, args.model, prompts[:1], args.max_tokens, 1)  # warm-up, not counted
            for model in models:
                for phase, conc in (("one_at_a_time", 1), (f"concurrent_{args.concurrency}", args.concurrency)):
                    cpu0 = server.cpu_s()
                    run = ask(server.url, model, prompts, args.max_tokens, conc)
                    run["cpu_s_per_token"] = round((server.cpu_s() - cpu0) / max(run["tokens"], 1), 4)
                    out[f"{model}:{phase}"] = run
                    print(f"{engine:8} {model:28} {phase:16} {run['tok_per_s']:7.2f} tok/s  p50 {run['p50_s']:6.2f} s  "
                          f"p99 {run['p99_s']:6.2f} s  CPU {run['cpu_s_per_token']:.4f} s/token  "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)
            out["peak_rss_gb"] = round(server.peak_rss / 2**30, 2)
            out["load_after"] = os.getloadavg()[0]
            return out
        finally:
            server.stop()


def vllm_of(server: Served) -> openai.OpenAI:
    """A client straight to the vLLM that ``server`` started: its socket (``--uds`` on its command line) and its
    key (``VLLM_API_KEY`` in its environment, readable by the same user only)."""
    for p in server.processes():
        cmd = p.cmdline()
        if "--uds" in cmd and any(a.endswith("tunesmith_vllm_shim.py") for a in cmd):
            key = p.environ()["VLLM_API_KEY"]
            transport = httpx.HTTPTransport(uds=cmd[cmd.index("--uds") + 1],
                                            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
            return openai.OpenAI(base_url="http://vllm/v1", api_key=key, max_retries=0, timeout=1800,
                                 http_client=httpx.Client(transport=transport, timeout=1800))
    raise SystemExit("no vLLM process under the server")


def front_cpu_s(server: Served) -> float:
    """CPU seconds of tunesmith's own server process (vLLM's processes left out)."""
    t = psutil.Process(server.proc.pid).cpu_times()
    return t.user + t.system


def front_vs_direct(args, prompts: list[str]) -> dict:
    """The same requests to tunesmith's front and straight to its vLLM, alternating which goes first: one at a time
    request by request (each pair runs back to back, under the same load), ``--concurrency`` at once round by
    round. tokens/s of a way: its tokens over its wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        server = Served("vllm", args.model, [], Path(tmp))
        try:
            ways = {"front": openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=1800),
                    "direct": vllm_of(server)}
            for client in ways.values():  # warm-up, not counted
                ask(server.url, args.model, prompts[:2], args.max_tokens, 1, client)
            out = {"load_before": os.getloadavg()[0]}
            for conc in (1, args.concurrency):
                batches = [[p] for p in prompts] * args.rounds if conc == 1 else [prompts] * args.rounds
                runs, front_cpu = {"front": [], "direct": []}, 0.0
                for k, batch in enumerate(batches):
                    for way in (("front", "direct") if k % 2 == 0 else ("direct", "front")):
                        cpu0 = front_cpu_s(server)
                        runs[way].append(ask(server.url, args.model, batch, args.max_tokens, conc, ways[way]))
                        front_cpu += (front_cpu_s(server) - cpu0) if way == "front" else 0.0
                out[f"concurrent_{conc}"] = compared(runs, front_cpu, len(prompts) * args.rounds)
                r = out[f"concurrent_{conc}"]
                print(f"{conc:2d} at a time: front {r['front_tok_per_s']:.2f} tok/s, direct {r['direct_tok_per_s']:.2f} "
                      f"tok/s, front/direct {r['ratio']:.3f}x, identical answers {r['identical']}, front CPU "
                      f"{r['front_cpu_ms_per_request']:.1f} ms per request, load {os.getloadavg()[0]:.1f}", flush=True)
            out["load_after"] = os.getloadavg()[0]
            return out
        finally:
            server.stop()


def compared(runs: dict[str, list[dict]], front_cpu: float, requests: int) -> dict:
    tps = {w: sum(x["tokens"] for x in rs) / sum(x["wall_s"] for x in rs) for w, rs in runs.items()}
    same = sum(a == b for rf, rd in zip(runs["front"], runs["direct"], strict=True)
               for a, b in zip(rf["answers"], rd["answers"], strict=True))
    return {"front_tok_per_s": round(tps["front"], 2), "direct_tok_per_s": round(tps["direct"], 2),
            "ratio": round(tps["front"] / tps["direct"], 3), "identical": f"{same}/{requests}",
            "front_cpu_ms_per_request": round(1000 * front_cpu / requests, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--adapter", action="append", help="NAME=PATH, served and asked on both engines (repeatable)")
    ap.add_argument("--engines", nargs="+", default=["builtin", "vllm"])
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None, help="write the results (answers included) as JSON here")
    ap.add_argument("--front-vs-direct", action="store_true", help="tunesmith's front vs its vLLM asked directly")
    ap.add_argument("--rounds", type=int, default=3, help="with --front-vs-direct: alternating rounds per phase")
    args = ap.parse_args()
    prompts = questions(args.questions)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()}", flush=True)
    if args.front_vs_direct:
        result = front_vs_direct(args, prompts)
        if args.out:
            args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
        return
    results = {}
    for engine in args.engines:
        results[engine] = measure(engine, args, prompts)
        print(f"{engine}: start-up {results[engine]['startup_s']} s, peak memory {results[engine]['peak_rss_gb']} GB",
              flush=True)
    if len(results) == 2:
        a, b = (results[e] for e in args.engines)
        for key in (k for k in a if ":" in k):
            same = sum(x == y for x, y in zip(a[key]["answers"], b[key]["answers"], strict=True))
            ratio = b[key]["tok_per_s"] / a[key]["tok_per_s"]
            print(f"{key}: {args.engines[1]}/{args.engines[0]} tokens/s {ratio:.2f}x, identical greedy answers "
                  f"{same}/{len(prompts)}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()
