"""Two replicas of `tunesmith serve` on one PostgreSQL and one data folder, behind a per-request round robin (what
a load balancer does): the official client's files, chunked upload, stored completions, batch and eval flows
behave as on one server, another key reaches nothing on either, and a batch runs once."""

from __future__ import annotations

import itertools
import json
import time
from contextlib import ExitStack

import httpx2 as httpx
import openai
import pytest

from tunesmith.serve.app import ServeSettings, create_app
from tunesmith.serve.engines.builtin import Engine

from .conftest import running_server

pytestmark = pytest.mark.replicas  # several servers on one PostgreSQL: make test-replicas runs them

KEYS = frozenset({"k1", "k2"})


class RoundRobin(httpx.BaseTransport):
    """Each request to the next replica in turn."""

    def __init__(self, urls: list[str]):
        self.ports = itertools.cycle([httpx.URL(u).port for u in urls])
        self.inner = httpx.HTTPTransport()
        self.seen: list[int] = []

    def handle_request(self, request):
        port = next(self.ports)
        self.seen.append(port)
        request.url = request.url.copy_with(port=port)
        return self.inner.handle_request(request)


@pytest.fixture(scope="module")
def replicas(tiny_model_dir, tmp_path_factory, postgres):
    url, data_dir = postgres(), tmp_path_factory.mktemp("shared")
    with ExitStack() as stack:
        urls = []
        for _ in range(2):
            engine = Engine(str(tiny_model_dir), {}, max_batch=8, wait_ms=1)
            settings = ServeSettings(model=str(tiny_model_dir), api_keys=KEYS, data_dir=data_dir, database=url)
            urls.append(stack.enter_context(running_server(create_app(settings, engine))))
        balancer = RoundRobin(urls)

        def client(key):
            return openai.OpenAI(base_url=urls[0], api_key=key, max_retries=0, timeout=60,
                                 http_client=httpx.Client(transport=balancer))

        yield {"urls": urls, "a": client("k1"), "b": client("k2"), "model": str(tiny_model_dir),
               "balancer": balancer, "apps": None}


def test_files_and_a_chunked_upload_across_replicas(replicas):
    a, b = replicas["a"], replicas["b"]
    lines = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n' * 4
    f = a.files.create(file=("t.jsonl", lines), purpose="fine-tune")
    assert a.files.retrieve(f.id).bytes == len(lines)  # asked of the other replica
    assert a.files.content(f.id).read() == lines
    assert f.id in [x.id for x in a.files.list()]
    with pytest.raises(openai.NotFoundError):
        b.files.retrieve(f.id)
    up = a.uploads.create(filename="u.jsonl", purpose="fine-tune", bytes=len(lines), mime_type="text/jsonl")
    half = len(lines) // 2
    parts = [a.uploads.parts.create(up.id, data=chunk) for chunk in (lines[:half], lines[half:])]
    done = a.uploads.complete(up.id, part_ids=[p.id for p in parts])
    assert done.status == "completed" and a.files.content(done.file.id).read() == lines
    assert len(set(replicas["balancer"].seen)) == 2


def test_stored_completions_listed_by_metadata_on_either_replica(replicas):
    a, b, model = replicas["a"], replicas["b"], replicas["model"]
    made = [a.chat.completions.create(model=model, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=4,
                                      store=True, metadata={"team": "replica-test", "i": str(i)}) for i in range(4)]
    listed = [c.id for c in a.chat.completions.list(metadata={"team": "replica-test"}, limit=10)]
    assert listed == [c.id for c in made]
    for c in made:
        assert a.chat.completions.retrieve(c.id).id == c.id
    assert [c.id for c in b.chat.completions.list(metadata={"team": "replica-test"})] == []


def test_a_batch_runs_once_whichever_replica_is_asked(replicas):
    a, b, model = replicas["a"], replicas["b"], replicas["model"]
    body = "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": model, "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 4}}) + "\n"
        for i in range(6))
    f = a.files.create(file=("b.jsonl", body.encode()), purpose="batch")
    batch = a.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.time() + 120
    while (batch := a.batches.retrieve(batch.id)).status not in ("completed", "failed", "expired", "cancelled"):
        assert time.time() < deadline, batch
        time.sleep(0.2)
    assert batch.status == "completed" and batch.request_counts.completed == 6, batch
    out = [json.loads(line) for line in a.files.content(batch.output_file_id).read().splitlines()]
    assert sorted(x["custom_id"] for x in out) == [f"r{i}" for i in range(6)]  # each line once, not twice
    with pytest.raises(openai.NotFoundError):
        b.batches.retrieve(batch.id)


def test_an_eval_made_on_one_replica_runs_and_reads_on_the_other(replicas):
    a, b = replicas["a"], replicas["b"]
    ev = a.evals.create(name="replicas", data_source_config={"type": "custom", "item_schema": {
        "type": "object", "properties": {"answer": {"type": "string"}}}, "include_sample_schema": False},
        testing_criteria=[{"type": "string_check", "name": "is-yes", "input": "{{ item.answer }}",
                           "reference": "yes", "operation": "eq"}])
    run = a.evals.runs.create(ev.id, data_source={"type": "jsonl", "source": {"type": "file_content", "content": [
        {"item": {"answer": "yes"}}, {"item": {"answer": "no"}}]}})
    deadline = time.time() + 60
    while (run := a.evals.runs.retrieve(run.id, eval_id=ev.id)).status in ("queued", "in_progress"):
        assert time.time() < deadline
        time.sleep(0.2)
    assert run.status == "completed" and (run.result_counts.passed, run.result_counts.failed) == (1, 1), run
    with pytest.raises(openai.NotFoundError):
        b.evals.retrieve(ev.id)

