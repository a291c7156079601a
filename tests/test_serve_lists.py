"""Every list is paged in SQL, on both backends: the official client walks files, jobs (by metadata too), a job's
events, batches, evals, runs and output items a page at a time, in order, each item once, with OpenAI's page shape
(``has_more``, ``first_id``, ``last_id``); an ``after`` that names no item is a 400; a job's checkpoints page over
the kept ones only; and a page reads ``limit + 1`` rows, never the key's whole list."""

from __future__ import annotations

import json

import openai
import pytest

from tunesmith.serve.jobs.store import JobStore
from tunesmith.serve.store.database import Result

from .conftest import Q_CHECK, Q_SCHEMA, banking_rows, chat_lines, finished_eval_run, tiny_server_on

KEY = "k1"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def live(request, tiny_model_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp(f"lists-{request.param}")
    with tiny_server_on(request, tiny_model_dir, data_dir, api_keys=frozenset({KEY, "other"})) as base:
        yield {"client": openai.OpenAI(base_url=base, api_key=KEY, max_retries=0), "model": str(tiny_model_dir),
               "other": openai.OpenAI(base_url=base, api_key="other", max_retries=0)}


def walked(first_page) -> list[str]:
    """Every item's id over the client's auto-paging, each page checked for OpenAI's shape."""
    ids, page = [], first_page
    while True:
        data = [x.id for x in page.data]
        if data:
            assert page.first_id == data[0] and page.last_id == data[-1], page
        ids += data
        if not page.has_more:
            return ids
        page = page.get_next_page()


def test_files_jobs_and_events_are_paged_in_order(live):
    c = live["client"]
    made = [c.files.create(file=(f"f{i}.jsonl", b'{"item": {"q": "a"}}\n'), purpose="evals").id for i in range(5)]
    live["other"].files.create(file=("o.jsonl", b'{"item": {"q": "a"}}\n'), purpose="evals")
    assert walked(c.files.list(limit=2)) == made[::-1]  # newest first, as at OpenAI
    assert walked(c.files.list(limit=2, order="asc")) == made
    assert walked(c.files.list(limit=2, after=made[3])) == made[2::-1]
    with pytest.raises(openai.BadRequestError) as exc:
        c.files.list(after="file-nope")
    assert exc.value.body["param"] == "after" and exc.value.body["code"] == "invalid_cursor"

    training = c.files.create(file=("t.jsonl", chat_lines(banking_rows(("card_arrival",), 12))),
                              purpose="fine-tune").id
    jobs = [c.fine_tuning.jobs.create(model=live["model"], training_file=training,
                                      metadata={"team": "a" if i % 2 else "b"}).id for i in range(5)]
    c.fine_tuning.jobs.create(model=live["model"], training_file=training)  # no metadata
    listed = walked(c.fine_tuning.jobs.list(limit=2))
    assert listed[1:] == jobs[::-1] and len(listed) == 6
    assert walked(c.fine_tuning.jobs.list(limit=1, metadata={"team": "a"})) == [jobs[3], jobs[1]]
    assert walked(c.fine_tuning.jobs.list(limit=2, metadata={"team": "b"})) == [jobs[4], jobs[2], jobs[0]]
    assert walked(c.fine_tuning.jobs.list(metadata={"team": "c"})) == []
    events = c.fine_tuning.jobs.list_events(jobs[0], limit=1)
    assert [e.message for e in events.data] == ["Files validated, moving job to queued state"] and events.has_more
    second = c.fine_tuning.jobs.list_events(jobs[0], limit=1, after=events.data[0].id)
    assert second.data[0].message.startswith("Validating training file") and not second.has_more


def test_batches_evals_runs_and_output_items_are_paged_in_order(live):
    c, model = live["client"], live["model"]
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}}
    requests = c.files.create(file=("b.jsonl", json.dumps(line).encode() + b"\n"), purpose="batch").id
    batches = [c.batches.create(input_file_id=requests, endpoint="/v1/chat/completions",
                                completion_window="24h").id for _ in range(3)]
    assert walked(c.batches.list(limit=2)) == batches[::-1]

    config = {"type": "custom", "item_schema": Q_SCHEMA, "include_sample_schema": True}
    evals = [c.evals.create(name=f"e{i}", data_source_config=config, testing_criteria=[Q_CHECK]).id for i in range(3)]
    assert walked(c.evals.list(limit=2)) == evals  # asc by default, as at OpenAI
    assert walked(c.evals.list(limit=2, order="desc")) == evals[::-1]
    c.evals.update(evals[0], name="renamed")
    assert walked(c.evals.list(limit=1, order="desc", order_by="updated_at"))[0] == evals[0]
    rows = [{"item": {"q": f"q{i}"}, "sample": {"output_text": f"q{i}" if i % 2 else "no"}} for i in range(5)]
    source = {"type": "jsonl", "source": {"type": "file_content", "content": rows}}
    runs = [c.evals.runs.create(evals[1], data_source=source).id for _ in range(3)]
    assert walked(c.evals.runs.list(evals[1], limit=2)) == runs
    finished_eval_run(c, evals[1], runs[0])
    items = c.evals.runs.output_items.list(runs[0], eval_id=evals[1], limit=2)
    assert [i.datasource_item_id for i in items.data] == [0, 1] and items.has_more
    assert len(walked(items)) == 5
    passed = walked(c.evals.runs.output_items.list(runs[0], eval_id=evals[1], limit=1, status="pass"))
    assert len(passed) == 2
    backwards = c.evals.runs.output_items.list(runs[0], eval_id=evals[1], limit=5, order="desc")
    assert [i.datasource_item_id for i in backwards.data] == [4, 3, 2, 1, 0]


def test_a_page_reads_limit_plus_one_rows_and_checkpoints_page_over_kept_ones(store, tmp_path):
    jobs = JobStore(store)
    job = jobs.add_job("o", model="m", training_file="f", validation_file=None, suffix=None, seed=1,
                       method={"type": "supervised"}, metadata=None)
    for step in range(1, 8):
        kept = tmp_path / f"ckpt-{step}"
        if step % 2:  # the trainer deleted the even steps' weights
            kept.mkdir()
        jobs.add_checkpoint(job["id"], step, {}, str(kept), "ft:m")
    first, more = jobs.checkpoints_page(job["id"], None, 2)
    assert [c["step_number"] for c in first] == [7, 5] and more
    rest, more = jobs.checkpoints_page(job["id"], first[-1]["id"], 2)
    assert [c["step_number"] for c in rest] == [3, 1] and not more

    for i in range(50):
        store.add_file("o", f"{i}.jsonl", "evals", b"x")
    seen = []
    execute = store.db.execute

    def counted(sql, params=()):
        rows = list(execute(sql, params))
        seen.append(len(rows))
        return Result(rows, len(rows))

    store.db.execute = counted
    try:
        files, more = store.list_files("o", limit=3)
    finally:
        store.db.execute = execute
    assert len(files) == 3 and more and seen == [4]  # one query, limit + 1 rows of the 50
