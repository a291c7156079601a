"""Bad input is a 4xx naming the field, and racing requests leave objects in a right state, through the official
client against a live server (races as ``asyncio.gather`` of real HTTP calls).

Bad input: batch and evals files that are not UTF-8 or nest too deep (refused at upload, naming the line);
stored-completion filters out of range or of the wrong type (a distillation's and an eval run's); a job on a file not
uploaded for fine-tuning (a batch input file, a job's results CSV). States: two deletes of one model (one deletes,
the other is a 404); two ``uploads.complete`` of one upload (one file); a part sent while its upload is cancelled
(nothing kept on disk); an eval run cancelled while it waits for its lane's thread, or while it runs (it stays
cancelled); completions runs over stored completions without ``input_messages`` or without a ``model``, as OpenAI's
types allow.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import openai
import pytest

from tunesmith.serve.jobs.worker import work

from .conftest import banking_rows, chat_lines, finished_eval_run, tiny_server

LABELS = ("card_arrival", "pin_blocked", "age_limit")
EXACT = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
         "operation": "eq"}
ANSWERED = {"type": "string_check", "name": "answered", "input": "{{sample.output_text}}", "reference": "",
            "operation": "ne"}


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("states")
    with tiny_server(tiny_model_dir, data_dir, api_keys=frozenset({"k1", "k2"}), max_upload_mb=64) as url:
        yield {"url": url, "base": str(tiny_model_dir), "data_dir": data_dir,
               "c": openai.OpenAI(base_url=url, api_key="k1", max_retries=0)}


def aclient(live) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=live["url"], api_key="k1", max_retries=0, timeout=120)


async def outcomes(*calls) -> list:
    """Each call's result or the error it raised, the calls made at once."""
    return await asyncio.gather(*calls, return_exceptions=True)


def batch_line(live, custom_id: str, body: dict | None = None) -> bytes:
    body = body or {"model": live["base"], "messages": [{"role": "user", "content": "hi"}]}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": body}).encode() + b"\n"


# --- bad input ---------------------------------------------------------------------------------------------


def lines_of(live, purpose: str, value: bytes, custom_id: str = "a") -> bytes:
    """One line of a ``purpose`` file holding the JSON ``value`` (a request's field, or an item's)."""
    if purpose == "batch":
        return batch_line(live, custom_id).replace(b'"hi"', value)
    return b'{"item": {"q": ' + value + b"}}\n"


@pytest.mark.parametrize("purpose", ["batch", "evals"])
def test_a_file_that_is_not_utf8_is_a_400_naming_its_line(live, purpose):
    content = lines_of(live, purpose, b'"fine"') + lines_of(live, purpose, b'"\xe9t\xe9"', "b")
    with pytest.raises(openai.BadRequestError) as exc:
        live["c"].files.create(file=("f.jsonl", content), purpose=purpose)
    assert exc.value.body["param"] == "file" and exc.value.body["code"] == "invalid_file_format"
    assert "line 2: not UTF-8" in exc.value.body["message"], exc.value.body


@pytest.mark.parametrize("purpose", ["batch", "evals"])
@pytest.mark.parametrize("depth", [150, 200_000])
def test_a_line_nested_too_deep_is_a_400_naming_its_line(live, purpose, depth):
    nested = b"[" * depth + b"]" * depth
    with pytest.raises(openai.BadRequestError) as exc:
        live["c"].files.create(file=("f.jsonl", lines_of(live, purpose, nested)), purpose=purpose)
    assert exc.value.body["param"] == "file" and "line 1: nested deeper than 100 levels" in exc.value.body["message"]


BAD_FILTERS = [("created_after", 10**30), ("created_before", -1), ("created_after", "yesterday"),
               ("model", ["a", "b"]), ("metadata", ["a"]), ("limit", "ten")]


def param_of(call) -> str:
    """The param a call's 400 names, or what went wrong instead."""
    try:
        call()
    except openai.BadRequestError as exc:
        return exc.body["param"]
    except openai.APIStatusError as exc:
        return f"{exc.status_code}: {exc.body}"
    return "accepted"


def test_stored_completion_filters_out_of_range_or_mistyped_are_400_naming_the_field(live):
    c = live["c"]
    c.chat.completions.create(model=live["base"], messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                              store=True, metadata={"task": "filters"})
    ev = c.evals.create(data_source_config={"type": "stored_completions"}, testing_criteria=[ANSWERED])
    named = {}
    for field, value in BAD_FILTERS:
        named[f"distillation {field}={value!r}"] = (param_of(lambda f=field, v=value: c.post(
            "/files/from_stored_completions", body={f: v}, cast_to=object)), field)
        named[f"eval run {field}={value!r}"] = (param_of(lambda f=field, v=value: c.evals.runs.create(
            ev.id, data_source={"type": "jsonl", "source": {"type": "stored_completions", f: v}})),
            f"data_source.source.{field}")
    assert {k: got for k, (got, want) in named.items() if got != want} == {}
    run = c.evals.runs.create(ev.id, data_source={"type": "jsonl", "source": {  # in range: selected
        "type": "stored_completions", "created_after": 0, "created_before": 2**63 - 1, "metadata": {"task": "filters"}}})
    assert finished_eval_run(c, ev.id, run.id).result_counts.total == 1


# --- a model, its job and its files ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fine_tune(live):
    """A succeeded job of k1's: its fine-tuned model and its results file."""
    c = live["c"]
    f = c.files.create(file=("train.jsonl", chat_lines(banking_rows(LABELS, 8)[:16])), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model=live["base"], training_file=f.id, seed=1, suffix="states", method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 8}}})
    work(live["data_dir"], once=True)
    job = c.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    return job


def test_a_job_trains_only_on_a_file_uploaded_for_fine_tuning(live, fine_tune):
    c = live["c"]
    batch_file = c.files.create(file=("b.jsonl", batch_line(live, "a")), purpose="batch")
    for training_file in (batch_file.id, fine_tune.result_files[0]):
        with pytest.raises(openai.BadRequestError) as exc:
            c.fine_tuning.jobs.create(model=live["base"], training_file=training_file)
        assert exc.value.body["param"] == "training_file" and exc.value.body["code"] == "invalid_file_purpose"
    with pytest.raises(openai.BadRequestError) as exc:
        c.fine_tuning.jobs.create(model=live["base"], training_file=fine_tune.training_file,
                                  validation_file=batch_file.id)
    assert exc.value.body["param"] == "validation_file"


def test_deletes_of_one_model_at_once_delete_it_once(live, fine_tune):
    model = fine_tune.fine_tuned_model
    assert live["c"].models.retrieve(model).id == model

    async def at_once():
        async with aclient(live) as a:
            return await outcomes(*(a.models.delete(model) for _ in range(8)))

    results = asyncio.run(at_once())
    deleted = [r for r in results if not isinstance(r, BaseException)]
    missing = [r for r in results if isinstance(r, openai.NotFoundError)]
    assert len(deleted) == 1 and deleted[0].deleted and len(missing) == 7, results
    with pytest.raises(openai.NotFoundError):
        live["c"].models.retrieve(model)


# --- uploads ---------------------------------------------------------------------------------------------------


def test_two_completes_of_one_upload_make_one_file(live):
    c = live["c"]
    content = chat_lines(banking_rows(LABELS, 4)[:8])
    for round_ in range(3):
        name = f"race-{round_}.jsonl"
        up = c.uploads.create(bytes=len(content), filename=name, mime_type="text/jsonl", purpose="fine-tune")
        part = c.uploads.parts.create(upload_id=up.id, data=content)

        async def both(upload_id=up.id, part_id=part.id):
            async with aclient(live) as a:
                md5 = hashlib.md5(content).hexdigest()
                return await outcomes(*(a.uploads.complete(upload_id=upload_id, part_ids=[part_id], md5=md5)
                                        for _ in range(2)))

        results = asyncio.run(both())
        done = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, openai.BadRequestError)]
        assert len(done) == 1 and len(refused) == 1, results
        assert refused[0].body["code"] == "invalid_upload_status"
        assert [f.id for f in c.files.list().data if f.filename == name] == [done[0].file.id]


def test_a_part_sent_while_its_upload_is_cancelled_is_not_kept(live):
    """The cancel is sent later and later after the part (every 5 ms over 250 ms), so that some land while the
    part's body is read and written, between its upload's check and its record."""
    c, files = live["c"], live["data_dir"] / "files"
    data = b"x" * (8 * 1024 * 1024)
    for delay_ms in range(0, 250, 5):
        up = c.uploads.create(bytes=len(data), filename="big.bin", mime_type="text/jsonl", purpose="fine-tune")

        async def both(upload_id=up.id, delay_s=delay_ms / 1000):
            async with aclient(live) as a:
                part = asyncio.ensure_future(a.uploads.parts.create(upload_id=upload_id, data=data))
                await asyncio.sleep(delay_s)
                return await outcomes(part, a.uploads.cancel(upload_id))

        part, cancel = asyncio.run(both())
        assert not isinstance(cancel, BaseException) and cancel.status == "cancelled", cancel
        assert part is not None and (not isinstance(part, BaseException) or isinstance(part, openai.BadRequestError))
    assert not list(files.glob("part-*.bin"))  # every part's bytes are gone, whichever came first


# --- eval runs ------------------------------------------------------------------------------------------------


def test_an_eval_run_cancelled_while_it_waits_or_runs_stays_cancelled(live):
    c = live["c"]
    ev = c.evals.create(data_source_config={"type": "custom", "item_schema": {
        "type": "object", "properties": {"question": {"type": "string"}, "answer": {"type": "string"}}}},
        testing_criteria=[EXACT])
    rows = [{"item": {"question": f"question {i}", "answer": "a"}} for i in range(16)]
    slow = {"type": "completions", "model": live["base"], "source": {"type": "file_content", "content": rows},
            "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{item.question}}"}]},
            "sampling_params": {"max_completion_tokens": 300}}
    running = c.evals.runs.create(ev.id, data_source=slow)
    waiting = c.evals.runs.create(ev.id, data_source=slow)  # behind it: one eval-lane thread per key
    deadline = time.monotonic() + 60
    while c.evals.runs.retrieve(running.id, eval_id=ev.id).status == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert c.evals.runs.retrieve(waiting.id, eval_id=ev.id).status == "queued"
    assert c.evals.runs.cancel(waiting.id, eval_id=ev.id).status == "canceled"
    assert c.evals.runs.cancel(running.id, eval_id=ev.id).status == "canceled"
    quick = c.evals.runs.create(ev.id, data_source={"type": "jsonl", "source": {"type": "file_content", "content": [
        {"item": {"question": "q", "answer": "a"}, "sample": {"output_text": "a"}}]}})
    # the key's runs take the lane's thread in order: once this one is done, the running one has ended and the
    # waiting one has had its turn
    assert finished_eval_run(c, ev.id, quick.id, timeout=600).status == "completed"
    assert c.evals.runs.retrieve(running.id, eval_id=ev.id).status == "canceled"
    assert c.evals.runs.retrieve(waiting.id, eval_id=ev.id).status == "canceled"
    assert not c.evals.runs.output_items.list(waiting.id, eval_id=ev.id).data


def test_completions_runs_over_stored_completions_as_openais_types_allow(live):
    c = live["c"]
    asked = [c.chat.completions.create(model=live["base"], messages=[{"role": "user", "content": f"ask {i}"}],
                                       max_tokens=3, temperature=0, store=True, metadata={"task": "completions-run"})
             for i in range(2)]
    ev = c.evals.create(data_source_config={"type": "stored_completions", "metadata": {"task": "completions-run"}},
                        testing_criteria=[ANSWERED])
    source = {"type": "stored_completions"}
    as_stored = c.evals.runs.create(ev.id, data_source={"type": "completions", "source": source})
    as_stored = finished_eval_run(c, ev.id, as_stored.id)
    assert as_stored.status == "completed" and as_stored.result_counts.total == 2, as_stored
    items = c.evals.runs.output_items.list(as_stored.id, eval_id=ev.id).data
    stored = {a.id: a.choices[0].message.content for a in asked}
    assert {i.datasource_item["id"]: i.sample.output[0].content for i in items} == stored  # graded as they are
    again = c.evals.runs.create(ev.id, data_source={"type": "completions", "model": live["base"], "source": source,
                                                    "sampling_params": {"max_completion_tokens": 3}})
    again = finished_eval_run(c, ev.id, again.id)
    assert again.status == "completed" and again.per_model_usage[0].invocation_count == 2, again
    items = c.evals.runs.output_items.list(again.id, eval_id=ev.id).data
    assert sorted(i.sample.input[-1].content for i in items) == ["ask 0", "ask 1"]  # each stored request asked again
    with pytest.raises(openai.BadRequestError) as exc:  # a template without a model to ask is not honoured
        c.evals.runs.create(ev.id, data_source={"type": "completions", "source": source, "input_messages": {
            "type": "item_reference", "item_reference": "item.input"}})
    assert exc.value.body["param"] == "data_source.input_messages"
    with pytest.raises(openai.BadRequestError) as exc:  # rows of a file have no request of their own to ask
        c.evals.runs.create(ev.id, data_source={"type": "completions", "model": live["base"], "source": {
            "type": "file_content", "content": [{"item": {"id": "x"}}]}})
    assert exc.value.body["param"] == "data_source.input_messages"
