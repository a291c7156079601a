"""No store call on the event loop: a route's store work runs in the store lane (``serve/api/store_lane.py``), so
one key's slow queries stall no other key.

The fake sits at the seam: the app's store database is wrapped so that every call carrying one key's owner id
sleeps (that key's queries are slow: a table of millions of rows, a database far away). While that key lists its
files and keeps a stored completion, the other key's streams keep coming and its ``/v1/models`` answers at once; the
slow key's calls all ran off the loop and its answers are the objects it stored.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import pytest
from fastapi import FastAPI, Query, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel

from tunesmith.serve.api.auth import Key
from tunesmith.serve.api.store_lane import in_store_lane
from tunesmith.serve.lanes import Lanes

from .conftest import running_server

KEYS = ("key-slow", "key-other")
DELAY_S = 1.0  # each slow call of key-slow
PROMPT_S = 0.5  # the other key's every wait stays under half of one slow call (on the loop, each would stall it all)


class SlowFor:
    """The store's database, every call that carries ``owner`` among its parameters slowed by ``delay_s``; records
    where each slowed call ran: its thread's name, or ``"event loop"``."""

    def __init__(self, db, owner: str, delay_s: float):
        self.db, self.owner, self.delay_s = db, owner, delay_s
        self.ran_in: list[str] = []

    def _slow(self, rows) -> None:
        if any(self.owner in tuple(r) for r in rows):
            try:
                asyncio.get_running_loop()
                self.ran_in.append("event loop")
            except RuntimeError:
                self.ran_in.append(threading.current_thread().name)
            time.sleep(self.delay_s)

    def execute(self, sql, params=()):
        self._slow([params])
        return self.db.execute(sql, params)

    def executemany(self, sql, rows):
        self._slow(rows)
        return self.db.executemany(sql, rows)

    def __getattr__(self, name):
        return getattr(self.db, name)


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    from tunesmith.serve.app import ServeSettings, create_app
    from tunesmith.serve.engines.builtin import Engine
    from tunesmith.serve.store.keys import owner_id, server_secret

    data_dir = tmp_path_factory.mktemp("slow-store")
    engine = Engine(str(tiny_model_dir), {}, max_batch=8, wait_ms=1)
    app = create_app(ServeSettings(model=str(tiny_model_dir), data_dir=data_dir, api_keys=frozenset(KEYS)), engine)
    with running_server(app) as url:
        yield {"url": url, "app": app, "model": str(tiny_model_dir),
               "slow_owner": owner_id(server_secret(app.state.store.root), KEYS[0])}


def headers(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


class Neighbour(threading.Thread):
    """The other key: streams one completion after another and asks ``/v1/models`` between them until told to stop;
    every wait it met (a stream's first chunk, the gap between two chunks, a ``/v1/models`` answer) is kept."""

    def __init__(self, live):
        super().__init__(daemon=True)
        self.live, self.stop, self.started = live, threading.Event(), threading.Event()
        self.waits: list[tuple[float, float, str]] = []  # (when it ended, seconds, what)
        self.chunks = self.models = 0
        self.error: BaseException | None = None

    def run(self):
        body = {"model": self.live["model"], "prompt": "card arrival", "max_tokens": 16, "temperature": 0,
                "stream": True}
        try:
            with httpx.Client(base_url=self.live["url"], headers=headers(KEYS[1]), timeout=60) as client:
                while not self.stop.is_set():
                    last = time.perf_counter()
                    with client.stream("POST", "/completions", json=body) as r:
                        assert r.status_code == 200, r.read()
                        for line in r.iter_lines():
                            if line.startswith("data: {"):
                                now = time.perf_counter()
                                self.waits.append((now, now - last, "stream"))
                                last, self.chunks = now, self.chunks + 1
                                self.started.set()
                    t0 = time.perf_counter()
                    listed = client.get("/models")
                    assert listed.status_code == 200 and listed.json()["data"][0]["id"] == self.live["model"]
                    self.waits.append((time.perf_counter(), time.perf_counter() - t0, "/v1/models"))
                    self.models += 1
        except BaseException as exc:  # noqa: BLE001 - the test says what the neighbour met
            self.error = exc
            self.started.set()


def test_one_keys_slow_store_stalls_no_other_key(live):
    app, url = live["app"], live["url"]
    slow = httpx.Client(base_url=url, headers=headers(KEYS[0]), timeout=60)
    made = [slow.post("/files", files={"file": (f"q{i}.jsonl", b'{"item": {"q": 1}}\n')}, data={"purpose": "evals"})
            for i in range(2)]
    assert [m.status_code for m in made] == [200, 200]
    fake = SlowFor(app.state.store.db, live["slow_owner"], DELAY_S)
    neighbour = Neighbour(live)
    neighbour.start()
    assert neighbour.started.wait(60) and neighbour.error is None, neighbour.error
    app.state.store.db = fake
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(6) as pool:
            lists = list(pool.map(lambda _: slow.get("/files"), range(5)))
            kept = slow.post("/chat/completions", json={"model": live["model"], "max_tokens": 4, "store": True,
                                                        "messages": [{"role": "user", "content": "hi"}]})
        slow_s = time.perf_counter() - t0
    finally:
        app.state.store.db = fake.db
        neighbour.stop.set()
        neighbour.join(60)
    assert neighbour.error is None, neighbour.error
    assert all(r.status_code == 200 for r in lists), [r.text for r in lists]
    assert [sorted(f["id"] for f in r.json()["data"]) for r in lists] == [sorted(m.json()["id"] for m in made)] * 5
    assert kept.status_code == 200, kept.text
    assert slow_s >= 2 * DELAY_S, "the slow key's calls were not slowed: the test proves nothing"
    assert "event loop" not in fake.ran_in, f"a slow store call ran on the event loop: {fake.ran_in}"
    in_lane = [name for name in fake.ran_in if name.startswith("tunesmith-store")]
    assert len(in_lane) >= 5 + 2, fake.ran_in  # the lists; the quota check and the write of the stored completion
    stored = slow.get(f"/chat/completions/{kept.json()['id']}")
    assert stored.status_code == 200 and stored.json()["choices"] == kept.json()["choices"]
    during = [(seconds, what) for end, seconds, what in neighbour.waits if t0 < end < t0 + slow_s]
    assert len(during) > 20 and ("/v1/models" in {what for _, what in during}), during
    worst = max(during)
    assert worst[0] < PROMPT_S, f"the other key waited {worst[0]:.2f} s for {worst[1]} while the slow key's " \
                                f"queries ran (each {DELAY_S} s)"


class Item(BaseModel):
    name: str


def test_in_store_lane_runs_the_body_in_the_lane_with_every_parameter_resolved():
    """Path, query and body parameters and the key reach the plain ``def``, which runs in a store lane thread as the
    key's work; an ``async def`` or a route without ``request`` and ``key`` is refused when it is decorated."""
    app = FastAPI()
    app.state.lanes = Lanes()
    app.state.settings = type("Settings", (), {"api_keys": frozenset()})()

    @app.post("/things/{tid}")
    @in_store_lane
    def thing(tid: str, item: Item, request: Request, key: Key, n: int = Query(1, ge=1)):
        return {"tid": tid, "name": item.name, "n": n, "key": key, "thread": threading.current_thread().name,
                "busy": request.app.state.lanes.store.busy}

    with TestClient(app) as client:
        got = client.post("/things/t1?n=3", json={"name": "x"}).json()
        assert got["thread"].startswith("tunesmith-store") and got["busy"] == 1
        assert {k: got[k] for k in ("tid", "name", "n", "key")} == {"tid": "t1", "name": "x", "n": 3, "key": None}
        bad = client.post("/things/t1?n=0", json={"name": "x"})
        assert bad.status_code == 422 and json.loads(bad.text)["detail"][0]["loc"] == ["query", "n"]
    app.state.lanes.close()

    def keyless(request: Request):
        return None

    async def coroutine(request: Request, key: Key):
        return None

    for route in (keyless, coroutine):
        with pytest.raises(TypeError, match="plain def"):
            in_store_lane(route)
