"""Stored completions and the distillation loop through the official client: ``store: true`` with metadata keeps a
request and its answer for its key; they are listed by metadata and model, paged, retrieved, their messages read,
their metadata updated, deleted; an eval run reads them as a ``stored_completions`` source; and a filtered set
becomes a fine-tuning file (``tunesmith distill`` and its route) that trains a job whose model answers:
store → select → eval → fine-tuning file → job."""

from __future__ import annotations

import json

import openai
import pytest
from openai.types.chat import ChatCompletion

from tunesmith.serve.jobs.worker import work

from .conftest import EMBEDDED, banking_rows, embedded_server, tiny_server

TEACHER_SYSTEM = "You are a bank's support assistant. Answer in one short sentence."


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("stored")
    with tiny_server(tiny_model_dir, data_dir, api_keys=frozenset({"k1", "k2"})) as url:
        yield {"url": url, "base": str(tiny_model_dir), "data_dir": data_dir,
               "c": openai.OpenAI(base_url=url, api_key="k1", max_retries=0)}


def ask(live, text: str, store=True, metadata=None, stream=False, **more):
    messages = [{"role": "system", "content": TEACHER_SYSTEM}, {"role": "user", "content": text}]
    more.setdefault("max_tokens", 6)
    return live["c"].chat.completions.create(model=live["base"], messages=messages, temperature=0, store=store,
                                             metadata=metadata, stream=stream, **more)


def test_stored_completions_are_listed_retrieved_updated_and_deleted_per_key(live):
    c = live["c"]
    kept = [ask(live, f"question {i}", metadata={"app": "crud", "shard": str(i % 2)}) for i in range(5)]
    ask(live, "not kept", store=False)
    streamed = list(ask(live, "streamed and kept", metadata={"app": "crud", "shard": "s"}, stream=True))
    assert kept[0].metadata == {"app": "crud", "shard": "0"}
    listed = c.chat.completions.list(metadata={"app": "crud"}, limit=100)
    ids = [x.id for x in listed.data]
    assert ids == [k.id for k in kept] + [streamed[0].id] and all(isinstance(x, ChatCompletion) for x in listed.data)
    assert [x.id for x in c.chat.completions.list(metadata={"app": "crud", "shard": "1"}).data] == [kept[1].id, kept[3].id]
    first_page = c.chat.completions.list(metadata={"app": "crud"}, limit=2, order="desc")
    assert [x.id for x in first_page.data] == [streamed[0].id, kept[4].id] and first_page.has_more
    assert [x.id for x in first_page.get_next_page().data] == [kept[3].id, kept[2].id]
    got = c.chat.completions.retrieve(kept[2].id)
    assert got.choices[0].message.content == kept[2].choices[0].message.content and got.usage == kept[2].usage
    assert c.chat.completions.retrieve(streamed[0].id).choices[0].message.content == "".join(
        ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
    msgs = c.chat.completions.messages.list(kept[2].id)
    assert [m.content for m in msgs.data] == [TEACHER_SYSTEM, "question 2"] and msgs.data[0].id == f"{kept[2].id}-0"
    assert c.chat.completions.update(kept[2].id, metadata={"app": "crud", "reviewed": "yes"}).metadata["reviewed"] == "yes"
    assert [x.id for x in c.chat.completions.list(metadata={"reviewed": "yes"}).data] == [kept[2].id]
    other = openai.OpenAI(base_url=live["url"], api_key="k2", max_retries=0)
    assert other.chat.completions.list().data == []
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.retrieve(kept[0].id)
    assert c.chat.completions.delete(kept[0].id).deleted
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.retrieve(kept[0].id)
    with pytest.raises(openai.BadRequestError) as exc:
        ask(live, "x", metadata={str(i): "v" for i in range(17)})
    assert exc.value.body["param"] == "metadata"


@pytest.fixture(scope="module", params=["builtin", pytest.param("vllm", marks=pytest.mark.vllm)])
def teacher(request, tmp_path_factory):
    """A server over the embedded model, whose answers end by themselves (the tiny random model's never do), on the
    built-in engine (``make test``) and on vLLM (``make test-vllm``)."""
    data_dir = tmp_path_factory.mktemp("distill")
    with embedded_server(request.param, data_dir, api_keys=frozenset({"k1"}), max_tokens=96) as url:
        yield {"url": url, "base": EMBEDDED, "data_dir": data_dir,
               "c": openai.OpenAI(base_url=url, api_key="k1", max_retries=0)}


def test_the_distillation_loop_store_select_eval_file_job(teacher, tmp_path, monkeypatch):
    live, c = teacher, teacher["c"]
    questions = [r["text"] for r in banking_rows(("card_arrival", "pin_blocked"), 8)]
    # the last two answers are cut by max_tokens and must stay out of the file
    stored = [ask(live, q, metadata={"task": "support", "teacher": "base"}, max_tokens=96) for q in questions[:-2]]
    stored += [ask(live, q, metadata={"task": "support", "teacher": "base"}, max_tokens=2) for q in questions[-2:]]
    ask(live, "an unrelated call", metadata={"task": "other"})
    # select and evaluate the teacher's stored answers (a jsonl run grades them as they are)
    ev = c.evals.create(name="teacher answers", data_source_config={"type": "stored_completions",
                                                                    "metadata": {"task": "support"}},
                        testing_criteria=[{"type": "string_check", "name": "answered", "operation": "ne",
                                           "input": "{{sample.output_text}}", "reference": ""}])
    run = c.evals.runs.create(ev.id, name="stored", data_source={"type": "jsonl", "source": {
        "type": "stored_completions", "metadata": {"teacher": "base"}}})
    run = c.evals.runs.retrieve(run.id, eval_id=ev.id)
    for _ in range(200):
        if run.status in ("completed", "failed"):
            break
        import time

        time.sleep(0.1)
        run = c.evals.runs.retrieve(run.id, eval_id=ev.id)
    assert run.status == "completed", run
    assert run.result_counts.total == len(stored)
    items = c.evals.runs.output_items.list(run.id, eval_id=ev.id, limit=100).data
    assert {i.datasource_item["id"] for i in items} == {s.id for s in stored}
    # a completions run asks another model the stored questions
    rerun = c.evals.runs.create(ev.id, name="student", data_source={
        "type": "completions", "model": live["base"], "source": {"type": "stored_completions", "limit": 3},
        "input_messages": {"type": "item_reference", "item_reference": "item.input"},
        "sampling_params": {"max_completion_tokens": 4}})
    for _ in range(300):
        rerun = c.evals.runs.retrieve(rerun.id, eval_id=ev.id)
        if rerun.status in ("completed", "failed"):
            break
        import time

        time.sleep(0.1)
    assert rerun.status == "completed" and rerun.result_counts.total == 3, rerun
    # the fine-tuning file, through the CLI (it calls the route), and a job on it
    from typer.testing import CliRunner

    from tunesmith.cli import app

    monkeypatch.setenv("K1", "k1")
    out = tmp_path / "distilled.jsonl"
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["distill", str(out), "--base-url", live["url"], "--api-key-env", "K1",
                                      "--metadata", "task=support", "--drop-system", "--recipe"])
    assert result.exit_code == 0, result.output
    from tunesmith.config import load_recipe

    [teacher_endpoint] = load_recipe(out.with_suffix(".yaml")).eval.endpoints  # the report's teacher contender
    assert (teacher_endpoint.name, teacher_endpoint.model, teacher_endpoint.base_url) == ("teacher", EMBEDDED, live["url"])
    examples = [json.loads(line) for line in out.read_text().splitlines()]
    cut = sum(s.choices[0].finish_reason == "length" for s in stored)
    assert cut >= 2 and len(examples) == len(stored) - cut > 0
    assert all(e["messages"][0]["role"] == "user" and e["messages"][-1]["role"] == "assistant" for e in examples)
    [made] = [f for f in c.files.list(purpose="fine-tune").data if f.filename == "distilled.jsonl"]
    file_id = made.id
    assert c.files.content(file_id).read() == out.read_bytes()  # the file kept on the server is the one written here
    job = c.fine_tuning.jobs.create(model=live["base"], training_file=file_id, seed=1, suffix="student",
                                    method={"type": "supervised", "supervised": {"hyperparameters": {
                                        "n_epochs": 1, "batch_size": 4}}})
    work(live["data_dir"], once=True)
    job = c.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    answer = c.chat.completions.create(model=job.fine_tuned_model, max_tokens=4, temperature=0,
                                       messages=[{"role": "user", "content": questions[0]}])
    assert answer.usage.completion_tokens > 0
