"""What replicas on one PostgreSQL cost: the shared limit per request, and a replica's start time and memory.

1. **The shared limit**: a key's place taken and given back ``--requests`` times through
   :class:`tunesmith.serve.api.rate_limits.KeyLimiter` alone (one server: counted in memory) and with
   :class:`tunesmith.serve.api.shared_limits.SharedPlaces` on PostgreSQL (replicas: counted over all of them), one
   after another in one process; then the same with a tokens-per-minute limit too (each request's tokens charged
   between taking and giving back its place, as a route does). Prints each way's p50 and p99 per request and the
   differences. The peer: the same limiter without a database (what a single server pays).
2. **A replica**: ``tunesmith serve`` started ``--starts`` times on SQLite and on PostgreSQL (the embedded model,
   builtin engine), the seconds until ``GET /v1/models`` answers and the server's resident memory then.

PostgreSQL is a server of the benchmark's own (tests/pg.py: initdb in a temporary folder, a Unix socket).

    python benchmarks/replicas.py --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.pg import postgres_server  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from noisy_neighbour import MODEL  # noqa: E402
from serving_engines import Served  # noqa: E402


def percentiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"p50_ms": round(statistics.median(xs) * 1000, 3), "p99_ms": round(xs[int(len(xs) * 0.99) - 1] * 1000, 3)}


TOKENS = 100  # a request's tokens (prompt and max_tokens) when a tokens-per-minute limit is on


def limit_cost(url: str, n: int) -> dict:
    """Per request: a place taken and given back, and with tokens per minute on, its tokens charged between; in
    memory and over replicas. The tokens limit is never reached (every request is charged, none refused)."""
    from tunesmith.serve.api.rate_limits import KeyLimiter, KeyLimits
    from tunesmith.serve.api.shared_limits import SharedPlaces
    from tunesmith.serve.store import Store

    store = Store(Path(tempfile.mkdtemp(prefix="replicas-bench-")), url)
    out = {}
    ways = [("a place", KeyLimits(requests=64)),
            ("a place and its tokens", KeyLimits(requests=64, tokens_per_minute=TOKENS * n))]
    for what, limits in ways:
        for where, shared in (("in memory (one server)", None),
                              ("over replicas (PostgreSQL)", SharedPlaces(store, "r1"))):
            limiter = KeyLimiter(limits)
            limiter.shared = shared
            times = []
            for i in range(n):
                t0 = time.perf_counter()
                ticket = limiter.admit(f"key{i % 4}")
                ticket.charge(TOKENS)
                ticket.release()
                times.append(time.perf_counter() - t0)
            out[f"{what}, {where}"] = percentiles(times)
    store.db.close()
    return out


def start_cost(url: str | None, starts: int) -> dict:
    """``tunesmith serve`` (the embedded model, built-in engine) started ``starts`` times on SQLite (``url`` None)
    or on PostgreSQL: seconds until ``/v1/models`` answers and resident memory then, the medians."""
    seconds, rss = [], []
    for _ in range(starts):
        server = Served("builtin", MODEL, [], Path(tempfile.mkdtemp(prefix="replicas-start-")),
                        env={"TUNESMITH_DATABASE": url} if url else None)
        try:
            seconds.append(server.startup_s)
            rss.append(server.rss() / 2**20)
        finally:
            server.stop()
    return {"start_s": round(statistics.median(seconds), 2), "rss_mb": round(statistics.median(rss))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()}")
    with postgres_server(("bench",)) as urls:
        url = urls["bench"]
        limits = limit_cost(url, args.requests)
        for name, r in limits.items():
            print(f"{name}: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms")
        a, b, c, d = limits.values()
        print(f"the shared limit adds {b['p50_ms'] - a['p50_ms']:.3f} ms at the median, "
              f"{b['p99_ms'] - a['p99_ms']:.3f} ms at p99; with tokens per minute too "
              f"{d['p50_ms'] - c['p50_ms']:.3f} ms and {d['p99_ms'] - c['p99_ms']:.3f} ms")
        starts = {"sqlite": start_cost(None, args.starts), "postgresql": start_cost(url, args.starts)} \
            if args.starts else {}  # --starts 0: the shared limit alone
        for name, r in starts.items():
            print(f"tunesmith serve on {name}: ready in {r['start_s']} s, {r['rss_mb']} MB resident")
    print(f"load average at the end {os.getloadavg()}")
    if args.out:
        args.out.write_text(json.dumps({"limits": limits, "starts": starts, "requests": args.requests}, indent=2))


if __name__ == "__main__":
    main()
