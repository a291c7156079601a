"""The Batch API through the official client by base_url only: a batch file checked at upload (each bad line named),
a batch of chat completions answered on the server's engine with output lines matching their ``custom_id``s and
equal to the same requests' direct greedy answers (the built-in engine in ``make test``, vLLM in ``make
test-vllm``), list, cancel within seconds keeping what finished, a batch that survives a restart and goes on where
it stopped, per-key batches, and interactive requests answered while a batch fills the engine."""

from __future__ import annotations

import json
import time

import openai
import pytest

from .conftest import EMBEDDED, banking_rows, embedded_server, tiny_server

QUESTIONS = [r["text"] for r in banking_rows(("card_arrival", "pin_blocked", "age_limit"), 2)]


def batch_file(questions: list[str], max_tokens: int = 12, model: str = EMBEDDED) -> bytes:
    return "".join(json.dumps({"custom_id": f"q-{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": model, "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens, "temperature": 0}})
        + "\n" for i, q in enumerate(questions)).encode()


def wait(c, batch_id: str, until=("completed", "failed", "cancelled", "expired"), seconds: float = 600):
    deadline = time.monotonic() + seconds
    while True:
        batch = c.batches.retrieve(batch_id)
        if batch.status in until or time.monotonic() > deadline:
            return batch
        time.sleep(0.2)


@pytest.fixture(scope="module", params=["builtin", pytest.param("vllm", marks=pytest.mark.vllm)])
def live(request, tmp_path_factory):
    with embedded_server(request.param, tmp_path_factory.mktemp("batches"), api_keys=frozenset({"k1", "k2"}),
                         request_timeout_s=900) as url:
        yield {"url": url, "c": openai.OpenAI(base_url=url, api_key="k1", max_retries=0, timeout=600)}


def test_a_batch_of_chat_completions_equals_the_direct_greedy_answers(live):
    c = live["c"]
    f = c.files.create(file=("batch.jsonl", batch_file(QUESTIONS)), purpose="batch")
    batch = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                             metadata={"run": "held-out"})
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"run": "held-out"}
    batch = wait(c, batch.id)
    assert batch.status == "completed" and batch.request_counts.total == len(QUESTIONS), batch
    assert batch.request_counts.completed == len(QUESTIONS) and batch.error_file_id is None
    lines = [json.loads(x) for x in c.files.content(batch.output_file_id).read().splitlines()]
    assert sorted(x["custom_id"] for x in lines) == sorted(f"q-{i}" for i in range(len(QUESTIONS)))
    for line in lines:
        assert line["error"] is None and line["response"]["status_code"] == 200
        question = QUESTIONS[int(line["custom_id"][2:])]
        direct = c.chat.completions.create(model=EMBEDDED, messages=[{"role": "user", "content": question}],
                                           max_tokens=12, temperature=0)
        assert line["response"]["body"]["choices"][0]["message"]["content"] == direct.choices[0].message.content
    assert batch.id in [b.id for b in c.batches.list().data]
    other = openai.OpenAI(base_url=live["url"], api_key="k2", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    assert batch.id not in [b.id for b in other.batches.list().data]


def test_a_batch_file_is_checked_line_by_line_and_failing_lines_go_to_the_error_file(live):
    c = live["c"]
    bad = batch_file(QUESTIONS[:1]) + b'{"custom_id": "q-0", "method": "POST", "url": "/v1/chat/completions", ' \
        b'"body": {"model": "m"}}\n{"custom_id": "x", "method": "GET", "url": "/v1/models", "body": {}}\nnot json\n'
    with pytest.raises(openai.BadRequestError) as exc:
        c.files.create(file=("bad.jsonl", bad), purpose="batch")
    message = exc.value.body["message"]
    assert "line 2: custom_id 'q-0' is used twice" in message and "line 3: method must be POST" in message
    assert "line 4: not JSON" in message
    mixed = batch_file(QUESTIONS[:1]) + json.dumps({"custom_id": "e", "method": "POST", "url": "/v1/chat/completions",
                                                    "body": {"model": "no-such-model", "messages": [
                                                        {"role": "user", "content": "hi"}]}}).encode() + b"\n"
    f = c.files.create(file=("mixed.jsonl", mixed), purpose="batch")
    batch = wait(c, c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                     completion_window="24h").id)
    assert batch.status == "completed" and (batch.request_counts.completed, batch.request_counts.failed) == (1, 1)
    [error] = [json.loads(x) for x in c.files.content(batch.error_file_id).read().splitlines()]
    assert error["custom_id"] == "e" and error["response"]["status_code"] == 404
    assert error["error"]["code"] == "model_not_found"


def test_cancel_stops_within_seconds_and_keeps_what_finished(live):
    c = live["c"]
    f = c.files.create(file=("long.jsonl", batch_file(QUESTIONS * 10, max_tokens=48)), purpose="batch")
    batch = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 300
    while c.batches.retrieve(batch.id).request_counts.completed < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    t0 = time.monotonic()
    assert c.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    batch = wait(c, batch.id, seconds=60)
    assert batch.status == "cancelled" and time.monotonic() - t0 < 30, batch
    kept = batch.request_counts.completed
    assert 1 <= kept < len(QUESTIONS) * 10
    assert len(c.files.content(batch.output_file_id).read().splitlines()) == kept


def test_a_batch_survives_a_restart_and_goes_on_where_it_stopped(tiny_model_dir, tmp_path):
    """One line at a time; the server stops after some lines; a new server on the same data folder answers the
    rest, each line once."""
    settings = {"api_keys": frozenset({"k1"}), "batch_concurrency": 1}
    requests = batch_file(QUESTIONS, max_tokens=24, model=str(tiny_model_dir))
    with tiny_server(tiny_model_dir, tmp_path, **settings) as url:
        c = openai.OpenAI(base_url=url, api_key="k1", max_retries=0)
        f = c.files.create(file=("b.jsonl", requests), purpose="batch")
        batch = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        while c.batches.retrieve(batch.id).request_counts.completed < 3:
            time.sleep(0.05)
    with tiny_server(tiny_model_dir, tmp_path, **settings) as url:
        c = openai.OpenAI(base_url=url, api_key="k1", max_retries=0)
        before = c.batches.retrieve(batch.id)
        assert 3 <= before.request_counts.completed, before
        done = wait(c, batch.id)
        ids = [json.loads(x)["custom_id"] for x in c.files.content(done.output_file_id).read().splitlines()]
    assert done.status == "completed" and done.request_counts.completed == len(QUESTIONS), done
    assert sorted(ids) == sorted(f"q-{i}" for i in range(len(QUESTIONS)))  # every line once


def test_interactive_requests_are_answered_while_a_batch_fills_the_engine(tiny_model_dir, tmp_path):
    """A batch of 60 lines, 4 in flight, on a batch of 4 rows: an interactive request of the same key is answered
    long before the batch ends (the engine admits it round robin beside the batch's rows)."""
    with tiny_server(tiny_model_dir, tmp_path, api_keys=frozenset({"k1"}), max_batch=4, batch_concurrency=4) as url:
        c = openai.OpenAI(base_url=url, api_key="k1", max_retries=0)
        f = c.files.create(file=("b.jsonl", batch_file(QUESTIONS * 5, 48, str(tiny_model_dir))), purpose="batch")
        batch = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        while c.batches.retrieve(batch.id).request_counts.completed < 2:
            time.sleep(0.05)
        c.chat.completions.create(model=str(tiny_model_dir), messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        during = c.batches.retrieve(batch.id)
        assert during.status == "in_progress" and during.request_counts.completed < len(QUESTIONS) * 5, during
        assert wait(c, batch.id).status == "completed"


def test_a_large_batch_does_not_hold_another_keys_small_one_behind_it(tiny_model_dir, tmp_path):
    with tiny_server(tiny_model_dir, tmp_path, api_keys=frozenset({"k1", "k2"}), max_batch=4, batch_concurrency=4) as url:
        big, small = (openai.OpenAI(base_url=url, api_key=k, max_retries=0) for k in ("k1", "k2"))
        f = big.files.create(file=("big.jsonl", batch_file(QUESTIONS * 30, 48, str(tiny_model_dir))), purpose="batch")
        large = big.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        while big.batches.retrieve(large.id).request_counts.completed < 2:
            time.sleep(0.05)
        g = small.files.create(file=("small.jsonl", batch_file(QUESTIONS[:2], 8, str(tiny_model_dir))), purpose="batch")
        done = wait(small, small.batches.create(input_file_id=g.id, endpoint="/v1/chat/completions",
                                                completion_window="24h").id)
        assert done.status == "completed" and done.request_counts.completed == 2
        assert big.batches.retrieve(large.id).status == "in_progress"  # the small one did not wait for it
        big.batches.cancel(large.id)


def test_a_cancelled_batch_winding_down_reads_cancelling_until_it_is_cancelled():
    """The runner finishes a cancelled batch through its finalizing step; a client reading it meanwhile (the cancel
    call's own answer, once seen as 'finalizing' on a busy machine) sees OpenAI's 'cancelling'."""
    from tunesmith.serve.batches.routes import batch_object

    row = {"id": "batch-1", "status": "finalizing", "cancelling_at": 1, "errors": None}
    assert batch_object(row)["status"] == "cancelling"
    assert batch_object(row | {"cancelling_at": None})["status"] == "finalizing"
    assert batch_object(row | {"status": "cancelled"})["status"] == "cancelled"
