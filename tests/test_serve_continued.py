"""Continued fine-tuning through the official client: ``jobs.create(model="ft:…")`` (a job's fine-tuned model, or
one of its checkpoints' models) trains from those weights, says how in the job's events, and the new model answers,
its parent named by ``models.list``; another key's fine-tune is not a model it can train from. On vLLM (``make
test-vllm``) the continued model is served by vLLM like any fine-tune."""

from __future__ import annotations

import json

import openai
import pytest

from tunesmith.serve.jobs.worker import work

from .conftest import EMBEDDED, banking_rows, chat_lines, embedded_server, tiny_server

LABELS = ("card_arrival", "pin_blocked", "age_limit")
HYPER = {"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 20}


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("continued")
    with tiny_server(tiny_model_dir, data_dir, api_keys=frozenset({"k1", "k2"})) as url:
        c = openai.OpenAI(base_url=url, api_key="k1", max_retries=0)
        train = c.files.create(file=("train.jsonl", chat_lines(banking_rows(LABELS, 12)[:24])), purpose="fine-tune")
        first = c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=train.id, seed=1, suffix="first",
                                          method={"type": "supervised", "supervised": {"hyperparameters": HYPER}})
        work(data_dir, once=True)
        first = c.fine_tuning.jobs.retrieve(first.id)
        assert first.status == "succeeded", first.error
        yield {"url": url, "client": c, "base": str(tiny_model_dir), "data_dir": data_dir, "first": first,
               "train": train}


def messages_of(c, job_id: str) -> list[str]:
    return [e.message for e in c.fine_tuning.jobs.list_events(job_id, limit=100).data]


def test_a_job_continued_from_a_fine_tune_trains_from_its_weights_and_answers(live):
    c, first = live["client"], live["first"]
    more = c.files.create(file=("more.jsonl", chat_lines(banking_rows(LABELS, 12)[24:36])), purpose="fine-tune")
    second = c.fine_tuning.jobs.create(model=first.fine_tuned_model, training_file=more.id, seed=2, suffix="second",
                                       method={"type": "supervised", "supervised": {"hyperparameters": HYPER}})
    assert second.model == first.fine_tuned_model  # the job says what it was created from, as at OpenAI
    work(live["data_dir"], once=True)
    second = c.fine_tuning.jobs.retrieve(second.id)
    assert second.status == "succeeded", second.error
    assert any(m.startswith(f"Continuing from {first.fine_tuned_model}: its LoRA adapter trains on")
               for m in messages_of(c, second.id))
    models = {m.id: m.model_extra for m in c.models.list().data}
    assert models[second.fine_tuned_model]["parent"] == first.fine_tuned_model
    assert models[second.fine_tuned_model]["root"] == models[first.fine_tuned_model]["parent"] == live["base"]
    reply = c.chat.completions.create(model=second.fine_tuned_model, max_tokens=4, temperature=0,
                                      messages=[{"role": "user", "content": "Where is my card?"}])
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens > 0
    first_adapter = live["data_dir"] / "runs" / first.id / "attempt-1" / "train" / "adapter"  # its first claim's
    second_adapter = live["data_dir"] / "runs" / second.id / "attempt-1" / "train" / "adapter"
    assert first_adapter.is_dir() and second_adapter.is_dir()
    assert (second_adapter / "adapter_model.safetensors").read_bytes() != \
        (first_adapter / "adapter_model.safetensors").read_bytes()  # it trained on


def test_a_checkpoints_model_and_dpo_continue_too(live):
    c, first = live["client"], live["first"]
    [ckpt, *_] = c.fine_tuning.jobs.checkpoints.list(first.id).data
    pair = {"input": {"messages": [{"role": "user", "content": "My card has not arrived."}]},
            "preferred_output": [{"role": "assistant", "content": "card_arrival"}],
            "non_preferred_output": [{"role": "assistant", "content": "age_limit"}]}
    prefs = c.files.create(file=("dpo.jsonl", (json.dumps(pair) + "\n").encode() * 8), purpose="fine-tune")
    dpo = c.fine_tuning.jobs.create(model=ckpt.fine_tuned_model_checkpoint, training_file=prefs.id, seed=3,
                                    method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}})
    work(live["data_dir"], once=True)
    dpo = c.fine_tuning.jobs.retrieve(dpo.id)
    assert dpo.status == "succeeded", dpo.error
    assert any("merged into the base model first" in m for m in messages_of(c, dpo.id))


def test_another_keys_fine_tune_is_not_a_model_to_train_from(live):
    other = openai.OpenAI(base_url=live["url"], api_key="k2", max_retries=0)
    mine = other.files.create(file=("t.jsonl", chat_lines(banking_rows(LABELS, 12)[:8])), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as exc:
        other.fine_tuning.jobs.create(model=live["first"].fine_tuned_model, training_file=mine.id)
    assert exc.value.body["param"] == "model" and "not available for fine-tuning here" in exc.value.body["message"]


@pytest.mark.vllm
def test_a_continued_fine_tune_answers_on_vllm(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with embedded_server("vllm", data_dir, api_keys=frozenset({"k1"})) as url:
        c = openai.OpenAI(base_url=url, api_key="k1", max_retries=0, timeout=600)
        rows = banking_rows(LABELS, 8)
        models = []
        for i, (part, model) in enumerate(((rows[:12], EMBEDDED), (rows[12:24], None))):
            train = c.files.create(file=(f"t{i}.jsonl", chat_lines(part)), purpose="fine-tune")
            job = c.fine_tuning.jobs.create(model=model or models[-1], training_file=train.id, seed=i, suffix=f"v{i}",
                                            method={"type": "supervised", "supervised": {"hyperparameters": {
                                                "n_epochs": 1, "batch_size": 4}}})
            work(data_dir, once=True)
            job = c.fine_tuning.jobs.retrieve(job.id)
            assert job.status == "succeeded", job.error
            models.append(job.fine_tuned_model)
        assert {m.id: m.model_extra for m in c.models.list().data}[models[1]]["parent"] == models[0]
        reply = c.chat.completions.create(model=models[1], max_tokens=4, temperature=0,
                                          messages=[{"role": "user", "content": "Where is my card?"}])
        assert reply.model == models[1] and reply.usage.completion_tokens > 0
