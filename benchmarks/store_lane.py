"""What the store lane costs one request: ``GET /v1/files`` with its store work in the store lane (as served) against
the same route with its body run on the event loop (as before the lane), on one server, alternating in blocks.

An app of ``tunesmith serve`` on a fake engine (the route never asks it) and the embedded SQLite store (or
``--database postgresql://…``), served by uvicorn on 127.0.0.1; one key holding ``--files`` files asks
``--requests`` lists one at a time over one connection per side per block. Prints each side's p50 and p99 in
milliseconds and the difference at the median.

    python benchmarks/store_lane.py --requests 4000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx2 as httpx

from tunesmith.serve.app import ServeSettings, create_app
from tunesmith.serve.launch import serve_in_thread

KEY = "bench-key"


class NoEngine:
    """The engine's surface a server needs to start and stop; ``GET /v1/files`` never asks it."""

    base_name, heads, adapters, aliases = "none", {}, {}, {}

    def model_ids(self) -> list[str]:
        return [self.base_name]

    def close(self) -> None:
        pass


class OnTheLoop:
    """A lane that runs its call where it is awaited: the route's body on the event loop, as before the lane."""

    async def run(self, key, fn, *args, **_):
        return fn(*args)


def timed(client: httpx.Client, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.get("/files")
        out.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == 200, r.text
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=4000, help="lists per side")
    parser.add_argument("--block", type=int, default=250, help="lists per side before switching")
    parser.add_argument("--files", type=int, default=5, help="files the key holds")
    parser.add_argument("--database", default=None, help="a postgresql:// URL (default: SQLite in a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(ServeSettings(model="none", data_dir=Path(tmp), database=args.database,
                                       api_keys=frozenset({KEY})), NoEngine())
        server, root = serve_in_thread(app)
        try:
            with httpx.Client(base_url=f"{root}/v1", headers={"Authorization": f"Bearer {KEY}"}) as client:
                for i in range(args.files):
                    client.post("/files", files={"file": (f"f{i}.jsonl", b'{"item": {}}\n')}, data={"purpose": "evals"})
                lanes = app.state.lanes.lanes
                store_lane, sides = lanes["store"], {"store lane": [], "on the loop": []}
                timed(client, args.block)  # warm up
                for _ in range(max(1, args.requests // args.block)):
                    for side, lane in (("store lane", store_lane), ("on the loop", OnTheLoop())):
                        lanes["store"] = lane
                        sides[side] += timed(client, args.block)
                lanes["store"] = store_lane
        finally:
            server.should_exit = True
            server.thread.join(10)
    for side, ms in sides.items():
        q = statistics.quantiles(ms, n=100)
        print(f"{side:12s} n={len(ms)} p50 {statistics.median(ms):.3f} ms  p99 {q[98]:.3f} ms")
    added = statistics.median(sides["store lane"]) - statistics.median(sides["on the loop"])
    print(f"the store lane adds {added * 1000:.0f} µs at the median")


if __name__ == "__main__":
    main()
