"""Two replicas of `tunesmith serve` on one PostgreSQL and one data folder answer one batch together: its lines split
into chunks (small ones here: ``batch_chunk_lines``), each chunk answered by one replica, both replicas answering
chunks of it, every line once in the output file, in input order by chunk; a batch both run cancelled through one
of them ends within seconds, the lines it answered kept once."""

from __future__ import annotations

import json
import time
from collections import Counter
from contextlib import ExitStack

import openai
import pytest

from tunesmith.serve.app import ServeSettings, create_app
from tunesmith.serve.engines.builtin import Engine
from tunesmith.serve.store import Store

from .conftest import running_server

pytestmark = pytest.mark.replicas  # several servers on one PostgreSQL: make test-replicas runs them

CHUNK = 4


@pytest.fixture
def replicas(tiny_model_dir, tmp_path, postgres):
    url, data_dir = postgres(), tmp_path / "shared"
    with ExitStack() as stack:
        apps, urls = [], []
        for _ in range(2):
            engine = Engine(str(tiny_model_dir), {}, max_batch=8, wait_ms=1)
            settings = ServeSettings(model=str(tiny_model_dir), api_keys=frozenset({"k1"}), data_dir=data_dir,
                                     database=url, batch_chunk_lines=CHUNK, batch_concurrency=1)
            apps.append(create_app(settings, engine))
            urls.append(stack.enter_context(running_server(apps[-1])))
        store = Store(data_dir, url)
        stack.callback(store.db.close)
        yield {"apps": apps, "clients": [openai.OpenAI(base_url=u, api_key="k1", max_retries=0, timeout=60)
                                         for u in urls], "store": store, "model": str(tiny_model_dir)}


def create(client, model: str, n: int, max_tokens: int):
    lines = "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": model, "messages": [{"role": "user", "content": f"card question {i}"}], "max_tokens": max_tokens,
        "temperature": 0}}) + "\n" for i in range(n))
    f = client.files.create(file=("b.jsonl", lines.encode()), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")


def ended(client, batch_id: str, seconds: float = 240):
    deadline = time.time() + seconds
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "failed", "expired", "cancelled"):
        assert time.time() < deadline, batch
        time.sleep(0.2)
    return batch


def test_both_replicas_answer_chunks_of_one_batch_each_line_once_in_chunk_order(replicas):
    one, two = replicas["clients"]
    n = 16 * CHUNK  # a few seconds of work: the other replica looks for chunks every 2 s
    batch = create(one, replicas["model"], n, max_tokens=48)
    done = ended(two, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (n, n, 0)
    ids = [json.loads(x)["custom_id"] for x in two.files.content(done.output_file_id).read().splitlines()]
    assert sorted(ids, key=lambda c: int(c[1:])) == [f"r{i}" for i in range(n)]  # every line, once
    chunks = [int(c[1:]) // CHUNK for c in ids]
    assert chunks == sorted(chunks)  # the parts assembled in chunk order
    rows = replicas["store"].db.execute("SELECT chunk, status, answered_by, claimed_by FROM batch_chunks "
                                        "WHERE batch_id = ? ORDER BY chunk", (batch.id,)).fetchall()
    assert [(r["chunk"], r["status"], r["claimed_by"]) for r in rows] == [(c, "done", None) for c in range(16)]
    by = Counter(r["answered_by"] for r in rows)
    assert set(by) == {app.state.replica for app in replicas["apps"]}, by  # both replicas answered chunks of it


def test_a_cancel_asked_of_one_replica_ends_the_batch_both_run_each_finished_line_kept_once(replicas):
    one, two = replicas["clients"]
    batch = create(one, replicas["model"], 16 * CHUNK, max_tokens=48)
    store, deadline = replicas["store"], time.time() + 120
    while len({r[0] for r in store.db.execute("SELECT claimed_by FROM batch_chunks WHERE batch_id = ? AND "
                                              "claimed_by IS NOT NULL", (batch.id,))}) < 2:
        assert time.time() < deadline, "the replicas did not both take a chunk"
        time.sleep(0.05)
    t0 = time.time()
    assert two.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = ended(one, batch.id, seconds=60)
    assert done.status == "cancelled" and time.time() - t0 < 20, done
    kept = done.request_counts.completed
    assert 1 <= kept < 16 * CHUNK
    ids = [json.loads(x)["custom_id"] for x in one.files.content(done.output_file_id).read().splitlines()]
    assert len(ids) == len(set(ids)) == kept
