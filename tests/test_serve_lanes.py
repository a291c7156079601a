"""The server's lanes (tunesmith.serve.lanes): bounded threads given to keys in turn, a key's share capped, its line
capped with a 429, a caller that leaves giving its place back, and a deadline that counts the call's own time."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

import pytest

from tunesmith.serve.errors import APIError
from tunesmith.serve.lanes import Lane, Lanes, LaneSize, TooCostly, default_sizes
from tunesmith.serve.plan.requests import build

from . import faults


def blocker():
    """A function that holds its thread until released, and the event that releases it."""
    gate = threading.Event()

    def hold(tag):
        gate.wait(10)
        return tag

    return hold, gate


def test_one_key_holds_at_most_its_share_and_another_key_starts_at_once():
    async def main():
        lane = Lane("t", LaneSize(workers=2, per_key=1, queued=10), "tests")
        hold, gate = blocker()
        flood = [asyncio.ensure_future(lane.run("a", hold, i)) for i in range(5)]
        await asyncio.sleep(0.05)
        assert lane.running["a"] == 1 and lane.waiting("a") == 4  # its share: one thread of two
        t0 = time.perf_counter()
        quick = await lane.run("b", lambda: "b")  # the free thread is b's at once
        assert quick == "b" and time.perf_counter() - t0 < 1.0
        gate.set()
        assert await asyncio.gather(*flood) == [0, 1, 2, 3, 4]
        lane.close()

    asyncio.run(main())


def test_free_threads_go_to_waiting_keys_in_turn():
    async def main():
        lane = Lane("t", LaneSize(workers=1, per_key=1, queued=10), "tests")
        order: list[str] = []
        hold, gate = blocker()
        first = asyncio.ensure_future(lane.run("a", hold, "a0"))
        await asyncio.sleep(0.05)
        flood = [asyncio.ensure_future(lane.run("a", order.append, f"a{i}")) for i in (1, 2, 3)]
        await asyncio.sleep(0.01)
        quiet = asyncio.ensure_future(lane.run("b", order.append, "b1"))
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(first, *flood, quiet)
        assert order == ["a1", "b1", "a2", "a3"]  # b's call is served in its turn, not after all of a's
        lane.close()

    asyncio.run(main())


def test_a_full_line_is_a_429_naming_the_lane():
    async def main():
        lane = Lane("t", LaneSize(workers=1, per_key=1, queued=2), "grader runs")
        hold, gate = blocker()
        running = asyncio.ensure_future(lane.run("a", hold, 0))
        await asyncio.sleep(0.05)
        waiting = [asyncio.ensure_future(lane.run("a", hold, i)) for i in (1, 2)]
        await asyncio.sleep(0.05)
        with pytest.raises(APIError) as refused:
            await lane.run("a", hold, 3)
        assert refused.value.status == 429 and "grader runs" in refused.value.body["message"]
        assert "retry-after" in refused.value.headers
        assert lane.refusal("b") is None  # another key's line is its own
        gate.set()
        assert await asyncio.gather(running, *waiting) == [0, 1, 2]
        lane.close()

    asyncio.run(main())


def test_a_caller_that_leaves_while_waiting_gives_its_place_back():
    async def main():
        lane = Lane("t", LaneSize(workers=1, per_key=1, queued=10), "tests")
        hold, gate = blocker()
        running = asyncio.ensure_future(lane.run("a", hold, 0))
        await asyncio.sleep(0.05)
        left = asyncio.ensure_future(lane.run("a", hold, 1))
        await asyncio.sleep(0.05)
        left.cancel()
        await asyncio.sleep(0.05)
        assert lane.waiting("a") == 0
        gate.set()
        assert await running == 0
        assert await lane.run("a", lambda: "next") == "next"
        assert lane.busy == 0
        lane.close()

    asyncio.run(main())


def test_the_deadline_counts_the_call_not_its_wait():
    async def main():
        lane = Lane("t", LaneSize(workers=1, per_key=1, queued=10), "tests")
        first = asyncio.ensure_future(lane.run("a", time.sleep, 0.6))
        await asyncio.sleep(0.05)
        # waits ~0.55 s for the thread, then runs 0.1 s: within a 0.4 s deadline of its own
        assert await lane.run("b", lambda: time.sleep(0.1) or "ok", deadline_s=0.4) == "ok"
        await first
        with pytest.raises(TimeoutError):
            await lane.run("b", time.sleep, 0.5, deadline_s=0.1)
        assert lane.busy == 1  # the late call still holds its thread until it ends
        await asyncio.sleep(0.6)
        assert lane.busy == 0
        lane.close()

    asyncio.run(main())


def spin(seconds: float) -> str:
    """Busy for ``seconds`` of this thread's own CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
    return "spun"


def test_a_cost_bound_counts_the_calls_cpu_time_not_a_busy_machine():
    async def main():
        lane = Lane("t", LaneSize(workers=2, per_key=2, queued=10), "tests")
        # waiting (no CPU) for longer than the bound is not a cost: a busy machine makes a call slow, not costly
        assert await lane.run("a", lambda: time.sleep(0.8) or "slept", cpu_s=0.3) == "slept"
        started = time.monotonic()
        with pytest.raises(TooCostly):
            await lane.run("a", spin, 3.0, cpu_s=0.3)
        assert time.monotonic() - started < 2.0  # refused once it had spent its bound, not when it ended
        lane.close()

    asyncio.run(main())


SHIFTED_CLOCK_CALL = """
import asyncio, time
from tunesmith.serve.lanes import Lane, LaneSize

async def main():
    lane = Lane("t", LaneSize(workers=1, per_key=1, queued=1), "tests")
    print(await lane.run("a", lambda: time.sleep(0.6) or "slept", cpu_s=30))
    lane.close()

asyncio.run(main())
"""


def test_a_wall_clock_a_minute_ahead_is_not_a_minute_of_cpu(tmp_path):
    """libfaketime shifts a thread's CPU clock read by its id as it shifts the wall clock (a replica whose clock is
    off, as in the fault test): the bound compares two readings of that one clock, so the offset cancels out."""
    if faults.libfaketime() is None:
        pytest.skip("libfaketime is not installed (apt-get install faketime)")
    env = os.environ | faults.clock_env("+60s", tmp_path)
    shifted = subprocess.run([sys.executable, "-c", "import time, threading; print(time.clock_gettime("
                              "time.pthread_getcpuclockid(threading.get_ident())))"], env=env, capture_output=True,
                             text=True, check=True)
    assert float(shifted.stdout) > 59  # the clock this guards against really is shifted here
    out = subprocess.run([sys.executable, "-c", SHIFTED_CLOCK_CALL], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "slept", out.stderr[-2000:]


def test_a_plan_too_costly_is_a_400_and_one_too_slow_a_503():
    async def main():
        lane = Lane("plan", LaneSize(workers=2, per_key=2, queued=10), "tests")
        assert await build(lambda: time.sleep(0.6) or "plan", lane=lane, key="a", cpu_s=0.2, deadline_s=5) == "plan"
        with pytest.raises(APIError) as costly:
            await build(spin, 2.0, lane=lane, key="a", cpu_s=0.2, deadline_s=5)
        assert costly.value.status == 400 and costly.value.body["code"] == "request_too_complex"
        with pytest.raises(APIError) as slow:
            await build(time.sleep, 1.0, lane=lane, key="a", cpu_s=0.5, deadline_s=0.3)
        assert slow.value.status == 503 and slow.value.body["code"] == "server_busy"
        assert slow.value.headers["retry-after"] == "60"
        lane.close()

    asyncio.run(main())


def test_every_lane_leaves_another_key_a_thread():
    sizes = default_sizes(2)
    for name, size in sizes.items():
        if name == "tinker":  # one thread, its calls in turns of keys (a key's next call waits for another's)
            assert size.workers == size.per_key == 1
            continue
        assert size.per_key < size.workers, name
    lanes = Lanes(sizes)
    assert lanes.plan.size == sizes["plan"] and lanes.graders.size == sizes["graders"]
    lanes.close()


def test_a_large_json_body_is_parsed_in_the_files_lane(tiny_model_dir, tmp_path, monkeypatch):
    """A body past 256 KB is parsed in a lane thread as its key's work, and one that is not JSON is FastAPI's own
    400; a small one is parsed where it is read."""
    import threading

    import httpx2 as httpx

    from tunesmith.serve.api import json_body

    from .conftest import tiny_server

    threads: list[str] = []
    real = json_body.parsed
    monkeypatch.setattr(json_body, "parsed", lambda body, free_text=(): threads.append(threading.current_thread().name)
                        or real(body, free_text))
    with tiny_server(tiny_model_dir, tmp_path, api_keys=frozenset({"k"})) as url:
        headers = {"Authorization": "Bearer k", "content-type": "application/json"}
        long = {"model": str(tiny_model_dir), "messages": [{"role": "user", "content": "word " * 100_000}]}
        r = httpx.post(f"{url}/chat/completions", json=long, headers=headers, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"  # past the context: parsed first
        bad = httpx.post(f"{url}/chat/completions", content=b'{"model": "' + b"x" * 300_000, headers=headers, timeout=60)
        assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
        small = httpx.post(f"{url}/chat/completions", json={"model": str(tiny_model_dir), "max_tokens": 2,
                                                            "messages": [{"role": "user", "content": "hi"}]},
                           headers=headers, timeout=60)
        assert small.status_code == 200
    assert len(threads) == 3 and all(t.startswith("tunesmith-files") for t in threads[:2]), threads
    assert not threads[2].startswith("tunesmith-"), threads  # the small one: on the loop


TEAMS_OF_TORCH_LANES = """
import asyncio, os, sys, threading, torch
from tunesmith.serve.lanes import Lane, LaneSize, all_cores, default_sizes

def threads():
    return set(os.listdir("/proc/self/task"))

def work():
    x = torch.randn(256, 256, requires_grad=True)
    (x @ x).sum().backward()
    return torch.get_num_threads()

def engine_first(box):
    all_cores()  # the engine's thread at its start, before any request
    box["lanes_ran"].wait()
    box["engine"] = work()  # its first torch work comes after the lanes set theirs

async def main():
    torch.set_num_threads(2)
    work()  # the main thread's team
    box = {"lanes_ran": threading.Event()}
    engine = threading.Thread(target=engine_first, args=(box,))
    engine.start()
    for name in sys.argv[1:]:
        size = default_sizes(2)[name] if name in default_sizes(2) else LaneSize(1, 1, 1)
        lane = Lane(name, size, "tests")
        await lane.run("a", lambda: None)
        before = threads()
        used = await lane.run("a", work)
        print(name, used, len(threads() - before))  # threads started by the lane's work
        lane.close()
    box["lanes_ran"].set()
    engine.join()
    print("engine", box["engine"], 0)

asyncio.run(main())
"""


def test_lanes_that_run_torch_keep_no_openmp_team_of_their_own():
    """A lane thread that runs torch (Tinker, embeddings, heads) runs it on one intra-op thread, so it starts no OpenMP
    team beside the engine's: teams outnumbering the cores make every team's small products slower
    (``tunesmith.serve.lanes.torch_threads``). A lane without that setting (``plain``, first) shows what the check sees
    otherwise. The engine's thread, started before them with ``all_cores``, keeps every core at its first torch work
    after them (torch starts a thread's count lazily from the number set last by any thread)."""
    out = subprocess.run([sys.executable, "-c", TEAMS_OF_TORCH_LANES, "plain", "tinker", "embeddings", "heads"],
                         capture_output=True, text=True, timeout=120, env=os.environ | {"OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-2000:]
    seen = {name: (int(used), int(new)) for name, used, new in (line.split() for line in out.stdout.splitlines())}
    assert seen["tinker"] == seen["embeddings"] == seen["heads"] == (1, 0)
    assert seen["plain"][0] == 2 and seen["plain"][1] >= 1  # torch's default: a team of its own, its threads new
    assert seen["engine"][0] == 2

