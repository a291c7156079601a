"""Inference is shared fairly between API keys: every step's rows are shared over keys (tests/test_serve_shares.py),
not first come first served, and per-key limits (requests in flight, tokens a minute) answer 429 with the headers
the official clients read. The noisy-neighbour measurement on both engines is benchmarks/noisy_neighbour.py."""

from __future__ import annotations

import asyncio
import threading
import time

import openai
import pytest

from tunesmith.serve.api.rate_limits import KeyLimiter, KeyLimits
from tunesmith.serve.engines.builtin import Engine
from tunesmith.serve.engines.interface import GenParams
from tunesmith.serve.errors import APIError

from .conftest import EMBEDDED, embedded_server


def test_a_key_behind_a_flood_is_admitted_at_the_next_free_place(tiny_model_dir):
    """Two places in the batch, 24 requests of one key queued first: the other key's one request ends long before
    the flood's last (first come first served would put it after all 24)."""
    engine = Engine(str(tiny_model_dir), {}, max_batch=2, wait_ms=1)

    async def scenario():
        ids = engine.text_prompt_ids("hello")
        # long flood rows, a short other one: the other arrives while the first flood rows still run, however
        # slow this machine is at the moment
        flood = [engine.submit(engine.base_name, ids, [GenParams(48)], tenant="flood") for _ in range(24)]
        await asyncio.sleep(0.01)
        other = engine.submit(engine.base_name, ids, [GenParams(4)], tenant="other")
        order: list[str] = []

        async def watch(name, request):
            await request.results()
            order.append(name)

        await asyncio.gather(watch("other", other), *(watch(f"flood{i}", r) for i, r in enumerate(flood)))
        return order

    try:
        order = asyncio.run(scenario())
    finally:
        engine.close()
    assert order.index("other") <= 4, order  # within the next few free places, not behind the 24


def test_per_key_limits_unit():
    now = [0.0]
    limiter = KeyLimiter(KeyLimits(requests=2, tokens_per_minute=100), clock=lambda: now[0], jitter=lambda: 0.0)
    a1, a2 = limiter.admit("a"), limiter.admit("a")
    with pytest.raises(APIError) as exc:
        limiter.admit("a")
    assert exc.value.status == 429 and exc.value.body["type"] == "requests"
    assert exc.value.headers["x-ratelimit-remaining-requests"] == "0" and exc.value.headers["retry-after"] == "1"
    limiter.admit("b").release()  # another key is not held back
    a1.charge(60)
    with pytest.raises(APIError) as exc:
        a2.charge(50)
    assert exc.value.body["type"] == "tokens" and exc.value.headers["x-ratelimit-remaining-tokens"] == "40"
    assert exc.value.headers["retry-after"] == "60" and not a2.held  # its place let go with the refusal
    a1.release()
    now[0] = 61.0  # the minute has passed
    limiter.admit("a").charge(100)
    spread = iter([0.0, 0.5, 0.99])
    slow = KeyLimiter(KeyLimits(requests=1), clock=lambda: now[0], jitter=lambda: next(spread))
    held = slow.admit("c")
    now[0] += 12.0
    held.release()  # its requests take about 12 s: a refused one is asked to come back then, not every second,
    slow.admit("c")  # each refused client at its own moment within one more request's time
    waits = []
    for _ in range(3):
        with pytest.raises(APIError) as exc:
            slow.admit("c")
        waits.append(int(exc.value.headers["retry-after-ms"]))
    assert waits == [12000, 18000, 23880]
    first = KeyLimiter(KeyLimits(requests=1), clock=lambda: now[0], jitter=lambda: 0.0)
    running = first.admit("d")  # none of d's requests has ended yet: no typical time
    with pytest.raises(APIError) as exc:
        first.admit("d")
    assert exc.value.headers["retry-after-ms"] == "1000"  # just admitted: at least a second
    now[0] += 7.5
    with pytest.raises(APIError) as exc:  # the one in flight has run 7.5 s: its crowd is not told "1 s" each
        first.admit("d")
    assert exc.value.headers["retry-after-ms"] == "7500"
    running.release()
    assert "d" not in first.oldest and first.typical_s["d"] == 7.5


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    with embedded_server("builtin", tmp_path_factory.mktemp("limits"), api_keys=frozenset({"k1", "k2"}),
                         key_limits=KeyLimits(requests=1, tokens_per_minute=2000)) as url:
        yield url


def test_limits_answer_429_with_openais_headers_through_the_official_client(limited):
    """One request of k1 in flight: its second is a 429 the client reads (retry-after, x-ratelimit-*); k2 is served
    meanwhile; a request asking for more tokens than a minute allows is a 429 of type tokens."""
    k1 = openai.OpenAI(base_url=limited, api_key="k1", max_retries=0)
    k2 = openai.OpenAI(base_url=limited, api_key="k2", max_retries=0)
    started, chunks = threading.Event(), []

    def long_stream():
        for chunk in k1.chat.completions.create(model=EMBEDDED, messages=[{"role": "user", "content": "Count to 50."}],
                                                max_tokens=60, temperature=0, stream=True):
            chunks.append(chunk)
            started.set()

    runner = threading.Thread(target=long_stream)
    runner.start()
    assert started.wait(120)
    with pytest.raises(openai.RateLimitError) as exc:
        k1.chat.completions.create(model=EMBEDDED, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    headers = exc.value.response.headers
    assert headers["retry-after"] in ("1", "2") and headers["x-ratelimit-limit-requests"] == "1"
    assert exc.value.body["code"] == "rate_limit_exceeded"
    raw = k2.chat.completions.with_raw_response.create(model=EMBEDDED, messages=[{"role": "user", "content": "Hi"}],
                                                       max_tokens=4)
    assert raw.headers["x-ratelimit-remaining-requests"] == "0" and raw.parse().choices[0].message.content is not None
    runner.join(120)
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.RateLimitError) as exc:
        k2.completions.create(model=EMBEDDED, prompt="Hi", max_tokens=1990, n=2)
    assert exc.value.body["type"] == "tokens" and "lower max_tokens" in exc.value.body["message"]
    retried = openai.OpenAI(base_url=limited, api_key="k1", max_retries=2)  # the client waits and retries a 429
    assert retried.chat.completions.create(model=EMBEDDED, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=2).choices


def test_limits_are_off_for_one_key_and_a_batch_per_key_for_several():
    from tunesmith.serve.app import ServeSettings

    assert not ServeSettings(api_keys=frozenset({"a"})).limits_per_key.on
    assert ServeSettings(api_keys=frozenset({"a", "b"}), max_batch=16).limits_per_key == KeyLimits(requests=16)
    assert ServeSettings(api_keys=frozenset({"a", "b"}), engine="vllm").limits_per_key == KeyLimits(requests=256)
    chosen = KeyLimits(tokens_per_minute=1000)
    assert ServeSettings(api_keys=frozenset({"a", "b"}), key_limits=chosen).limits_per_key == chosen


def test_a_key_at_its_limit_is_answered_at_the_edge_before_its_body_is_read(monkeypatch):
    from tunesmith.serve.api import rate_limits
    from tunesmith.serve.api.auth import bearer_of
    from tunesmith.serve.api.rate_limits import EdgeLimit

    limiter = KeyLimiter(KeyLimits(requests=1), jitter=lambda: 0.0)
    limiter.admit("owner-1")
    passed, sent = [], []
    owners = {"k1": "owner-1", "k2": "owner-2"}  # what auth.owner_of gives for the server's keys

    async def app(scope, receive, send):
        passed.append(scope["path"])

    async def receive():
        raise AssertionError("the body was read")

    async def send(message):
        sent.append(message)

    edge = EdgeLimit(app, lambda: limiter, lambda scope: owners.get(bearer_of(scope)))

    def scope(key, path="/v1/chat/completions", **more):
        return {"type": "http", "method": "POST", "path": path, "headers": [(b"authorization", f"Bearer {key}".encode())],
                **more}

    monkeypatch.setattr(rate_limits, "HOLD_S", 0.4)
    t0 = time.perf_counter()
    asyncio.run(edge(scope("k1"), receive, send))
    assert time.perf_counter() - t0 >= 0.2  # held before it is answered (0.4 s times 0.5 + jitter 0)
    assert sent[0]["status"] == 429 and dict(sent[0]["headers"])[b"retry-after"] == b"1" and not passed
    assert json_body(sent[1])["error"]["code"] == "rate_limit_exceeded"
    for other in (scope("k2"), scope("k1", "/v1/files"), scope("nope"), scope("k1", **{"tunesmith.batch": "b"})):
        asyncio.run(edge(other, receive, send))  # another key, another route, no real key, a batch's line
    assert len(passed) == 4


def test_a_held_refusal_lets_the_request_through_when_a_place_frees_and_holds_no_more_than_its_cap(monkeypatch):
    """A client retrying at once meets a refusal held before it is answered; a place freed meanwhile lets one held
    request in at once; past MAX_HELD held refusals of one key, the next is answered at once and closes its
    connection."""
    from tunesmith.serve.api import rate_limits
    from tunesmith.serve.api.rate_limits import EdgeLimit

    monkeypatch.setattr(rate_limits, "HOLD_S", 0.6)  # held 0.3 s: the jitter below is 0
    monkeypatch.setattr(rate_limits, "MAX_HELD", 2)
    limiter = KeyLimiter(KeyLimits(requests=1), jitter=lambda: 0.0)
    first = limiter.admit("o")
    passed: list[float] = []

    async def app(scope, receive, send):  # the route takes the place itself, as chat_completions does
        try:
            limiter.admit("o")
            passed.append(time.perf_counter())
        except APIError:
            pass

    async def main():
        sent: list[list[dict]] = [[] for _ in range(4)]
        edge = EdgeLimit(app, lambda: limiter, lambda scope: "o")
        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}

        async def call(i):
            async def send(message):
                sent[i].append(message)
            await edge(dict(scope), None, send)

        t0 = time.perf_counter()
        calls = [asyncio.ensure_future(call(i)) for i in range(3)]
        await asyncio.sleep(0.05)
        third = sent[2]
        assert third and third[0]["status"] == 429 and (b"connection", b"close") in third[0]["headers"]  # past the cap
        first.release()  # a place frees while two are held
        await asyncio.gather(*calls)
        assert len(passed) == 1 and passed[0] - t0 < 0.25  # one held request took the freed place at once
        assert time.perf_counter() - t0 >= 0.3  # the other was held its whole time, then refused
        assert all(s and s[0]["status"] == 429 for i, s in enumerate(sent[:2]) if s)

    asyncio.run(main())


def json_body(message) -> dict:
    import json

    return json.loads(message["body"])


def test_a_crowd_of_refused_clients_comes_back_a_few_times_a_second_and_a_freed_place_is_soon_taken():
    """200 clients of one key at a limit of 1, each waiting out its retry-after, requests of 3 s: told one request's
    time each, they came back ~45 times a second (every refusal an HTTP request the server answers); spread by the
    crowd's size they come back about RETRIES_PER_S times a second, and a freed place still waits well under a
    second for one of them."""
    import heapq
    import random as rnd

    from tunesmith.serve.api.rate_limits import RETRIES_PER_S

    now = [0.0]
    limiter = KeyLimiter(KeyLimits(requests=1), clock=lambda: now[0], jitter=rnd.Random(0).random)
    events = [(0.001 * i, "retry", i) for i in range(200)]  # (when, what, client)
    heapq.heapify(events)
    refusals, idle, freed_at, ticket = [], [], None, None
    while events and now[0] < 300:
        now[0], what, client = heapq.heappop(events)
        if what == "done":
            ticket.release()
            ticket, freed_at = None, now[0]
            heapq.heappush(events, (now[0], "retry", client))  # the client that was answered sends its next one
            continue
        try:
            ticket = limiter.admit("flood")
        except APIError as exc:
            refusals.append(now[0])
            heapq.heappush(events, (now[0] + int(exc.headers["retry-after-ms"]) / 1000, "retry", client))
            continue
        if freed_at is not None:
            idle.append(now[0] - freed_at)
        heapq.heappush(events, (now[0] + 3.0, "done", client))
    late = [t for t in refusals if t > 120]  # the crowd's steady state
    rate = len(late) / (now[0] - 120)
    assert rate <= 1.5 * RETRIES_PER_S and rate < 15, rate  # one request's time each: ~44 a second
    assert sum(idle) / len(idle) < 0.5 and len(idle) > 50  # the key still gets its one place nearly all the time


def test_the_servers_own_process_freezes_its_start_out_of_the_collectors_sight(tiny_model_dir, tmp_path):
    """A full collection of what the start built (the model, the libraries, the app) held the GIL 0.22 s, so every
    tenant's decoding stalled with it; `tunesmith serve` freezes it once the engine is up (a test's app does not)."""
    import gc

    from fastapi.testclient import TestClient

    from tunesmith.serve.app import ServeSettings, create_app

    def started(freeze: bool) -> int:
        app = create_app(ServeSettings(model=str(tiny_model_dir), data_dir=tmp_path / str(freeze)),
                         Engine(str(tiny_model_dir), {}, wait_ms=5))
        app.state.freeze_heap = freeze
        try:
            with TestClient(app):
                return gc.get_freeze_count()
        finally:
            gc.unfreeze()

    gc.unfreeze()
    assert started(False) == 0
    assert started(True) > 10_000


def test_work_handed_to_the_engine_runs_on_its_thread_and_steps_its_rows_at_its_turn_points(tiny_model_dir):
    """``run_beside``: work (a Tinker training call) runs on the engine's own thread with every core (no second torch
    team beside the engine's); a chat request sent while it runs is answered before it ends, stepped at its turn
    points (``step_between``), and the same without turn points waits for the work's end; the work's exception
    reaches its caller and the engine goes on serving."""
    import threading

    import torch

    from tunesmith.serve.lanes import cores

    engine = Engine(str(tiny_model_dir), {}, max_batch=8, wait_ms=1)

    def chat():
        return engine.submit(engine.base_name, engine.text_prompt_ids("hi"), [GenParams(8, stop_token_ids=())],
                             tenant="chat")

    async def beside(turns: bool) -> dict:
        seen, started, answered = {}, threading.Event(), threading.Event()

        def work():
            seen["thread"], seen["threads"] = threading.current_thread() is engine.worker, torch.get_num_threads()
            started.set()
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline and not answered.is_set():
                time.sleep(0.005)  # a stretch of the work
                if turns:
                    engine.step_between()
            seen["during"] = answered.is_set()
            return "done"

        handed = asyncio.ensure_future(asyncio.to_thread(engine.run_beside, work))
        await asyncio.to_thread(started.wait)
        request = chat()
        (generation,) = await request.results()
        answered.set()
        seen["answer"], seen["tokens"] = await handed, generation.completion_tokens
        return seen

    try:
        with_turns, without = asyncio.run(beside(True)), asyncio.run(beside(False))
        assert with_turns == {"thread": True, "threads": cores(), "during": True, "answer": "done", "tokens": 8}
        assert without["during"] is False and without["answer"] == "done"

        def fails():
            raise ValueError("the work's own error")

        with pytest.raises(ValueError, match="the work's own error"):
            engine.run_beside(fails)
        async def again():
            return await chat().results()

        assert len(asyncio.run(again())) == 1  # still serving
    finally:
        engine.close()


def test_a_light_key_between_two_requests_finds_a_core_free_of_heavy_steps(tiny_model_dir):
    """Between a light key's requests (its place kept for the shares' grace), a step of only heavy rows runs on one
    core fewer, so the server's event loop admits the key's next request on a free core; once the key is gone, the
    heavy steps take every core again."""
    from tunesmith.serve.lanes import cores

    if cores() < 2:
        pytest.skip("one core: there is none to leave")
    every = cores()
    engine = Engine(str(tiny_model_dir), {}, max_batch=8, wait_ms=1)
    now = [0.0]
    engine.shares.clock = lambda: now[0]
    steps = engine.steps_by_threads

    async def request(tenant: str, rows: int, tokens: int = 16):
        params = [GenParams(tokens, stop_token_ids=())] * rows
        return await engine.submit(engine.base_name, engine.text_prompt_ids("hello"), params, tenant=tenant).results()

    try:
        asyncio.run(request("light", 1))
        assert set(steps) == {every}  # a light key alone: every core
        now[0] += 0.1  # within its grace: between two of its requests
        asyncio.run(request("heavy", 6))
        assert steps[every - 1] >= 10
        before = dict(steps)
        now[0] += 10  # gone
        asyncio.run(request("heavy", 6))
        assert steps[every - 1] == before[every - 1] and steps[every] >= before[every] + 10
    finally:
        engine.close()
