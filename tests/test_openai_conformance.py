"""Conformance with the official `openai` client (3.54): every fine-tuning, model, responses and embeddings
endpoint driven through the client, and each raw answer validated *strictly* against the client's own
pydantic model (the client itself builds its objects without validation, so a missing or mistyped field
would otherwise pass unnoticed)."""

import base64
import json
from contextlib import ExitStack

import numpy as np
import openai
import pytest
from openai.types import CreateEmbeddingResponse, Model, ModelDeleted
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint
from openai.types.responses import Response

from tunesmith.serve.app import ServeSettings, create_app
from tunesmith.serve.engines.builtin import Engine
from tunesmith.serve.jobs.worker import work

from .conftest import banking_rows, chat_lines, running_server, vllm_engine

LABELS = ("card_arrival", "pin_blocked", "age_limit")
ALIAS = "gpt-4o-mini-2024-07-18"


def strict(model_cls, raw):
    """Validate a raw JSON answer against the client's model: required fields present, types exact."""
    return model_cls.model_validate(raw, strict=True)


def raw(call, *args, **kw) -> dict:
    """The JSON body of a client call (``client.x.with_raw_response.y``)."""
    return json.loads(call(*args, **kw).text)


@pytest.fixture(scope="module", params=["builtin", pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.slow])])
def live(request, tiny_model_dir, tmp_path_factory):
    """The server on the built-in engine (the tiny model), and on vLLM (the embedded model: vLLM's CPU kernels
    take no 16-wide attention heads)."""
    data_dir = tmp_path_factory.mktemp("conformance")
    with ExitStack() as stack:
        if request.param == "vllm":
            engine = stack.enter_context(vllm_engine(data_dir / "vllm"))
        else:
            engine = Engine(str(tiny_model_dir), {}, wait_ms=5)
        base = engine.base_name
        settings = ServeSettings(model=base, api_keys=frozenset({"k1", "k2"}), data_dir=data_dir, engine=request.param,
                                 model_aliases={ALIAS: base, "text-embedding-3-small": "all-minilm-l6-v2"})
        url = stack.enter_context(running_server(create_app(settings, engine)))
        yield {"url": url, "base": base, "data_dir": data_dir}


def client(live, key="k1") -> openai.OpenAI:
    return openai.OpenAI(base_url=live["url"], api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def trained(live):
    """One finished job with a validation file, 'auto' epochs and learning rate (a batch of 4 keeps it short),
    metadata and a W&B integration; created with the alias a script written for OpenAI uses."""
    c = client(live)
    rows = banking_rows(LABELS, 8)
    train = c.files.create(file=("train.jsonl", chat_lines(rows[::2])), purpose="fine-tune")
    valid = c.files.create(file=("valid.jsonl", chat_lines(rows[3::4])), purpose="fine-tune")
    created = raw(c.fine_tuning.jobs.with_raw_response.create, model=ALIAS, training_file=train.id,
                  validation_file=valid.id, suffix="conf", metadata={"team": "support", "run": "a"},
                  method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 4}}},
                  integrations=[{"type": "wandb", "wandb": {"project": "banking", "tags": ["t1"]}}])
    other = c.fine_tuning.jobs.create(model=live["base"], training_file=train.id, metadata={"team": "other"},
                                      method={"type": "supervised", "supervised": {"hyperparameters": {
                                          "n_epochs": 1, "batch_size": 4}}})
    work(live["data_dir"], once=True)
    return {"created": created, "id": created["id"], "other": other.id, "train": train.id}


def test_job_objects_carry_every_declared_field(live, trained):
    c = client(live)
    created = strict(FineTuningJob, trained["created"])
    assert created.status == "queued" and created.hyperparameters.n_epochs == "auto"
    assert created.model == live["base"]  # the alias resolved to the local base it trains
    assert created.integrations[0].wandb.project == "banking" and created.metadata == {"team": "support", "run": "a"}
    job = strict(FineTuningJob, raw(c.fine_tuning.jobs.with_raw_response.retrieve, trained["id"]))
    assert job.status == "succeeded", job.error
    hyper = job.method.supervised.hyperparameters
    # 'auto' is reported as the numbers used: 12 examples -> OpenAI's epoch rule gives 100 // 12 = 8; the
    # learning rate multiplier follows the batch (square root of 4)
    assert (hyper.n_epochs, hyper.batch_size, hyper.learning_rate_multiplier) == (8, 4, 2.0)
    assert job.hyperparameters.n_epochs == 8 and job.trained_tokens > 0 and job.estimated_finish is None
    assert job.finished_at >= job.created_at and job.result_files and job.seed is not None
    assert job.fine_tuned_model.startswith(f"ft:{live['base']}:conf:")


def test_jobs_list_pages_and_filters_on_metadata(live, trained):
    c = client(live)
    first = raw(c.fine_tuning.jobs.with_raw_response.list, limit=1)
    assert first["has_more"] is True and len(first["data"]) == 1
    strict(FineTuningJob, first["data"][0])
    rest = c.fine_tuning.jobs.list(limit=10, after=first["data"][0]["id"])
    assert [j.id for j in rest.data] and first["data"][0]["id"] not in [j.id for j in rest.data]
    assert [j.id for j in c.fine_tuning.jobs.list(metadata={"team": "support"}).data] == [trained["id"]]
    assert [j.id for j in c.fine_tuning.jobs.list(metadata={"team": "other"}).data] == [trained["other"]]
    assert c.fine_tuning.jobs.list(metadata={"team": "nobody"}).data == []
    unlabelled = c.fine_tuning.jobs.list(extra_query={"metadata": "null"}).data  # jobs without metadata
    assert trained["id"] not in [j.id for j in unlabelled] and all(not j.metadata for j in unlabelled)
    with pytest.raises(openai.BadRequestError) as exc:
        c.fine_tuning.jobs.list(after="ftjob-doesnotexist")
    assert exc.value.body["param"] == "after"


def test_events_and_checkpoints_page_and_parse(live, trained):
    c = client(live)
    events = raw(c.fine_tuning.jobs.with_raw_response.list_events, trained["id"], limit=3)
    assert events["has_more"] is True and len(events["data"]) == 3
    for e in events["data"]:
        strict(FineTuningJobEvent, e)
    # the client's auto-pagination walks every page through has_more and after
    messages = [e.message for e in c.fine_tuning.jobs.list_events(trained["id"], limit=10,
                                                                  after=events["data"][-1]["id"])]
    assert len(messages) > 30 and len(set(messages)) == len(messages)
    assert any("Nothing is sent to wandb.ai" in m for m in messages)
    assert any(m.startswith("Step ") for m in messages)
    page = raw(c.fine_tuning.jobs.checkpoints.with_raw_response.list, trained["id"], limit=1)
    assert page["has_more"] is True
    newest = strict(FineTuningJobCheckpoint, page["data"][0])
    assert newest.step_number == 8 * 12 // 4 and newest.metrics.train_loss is not None
    assert newest.metrics.full_valid_loss is not None and newest.metrics.valid_loss is not None
    older = c.fine_tuning.jobs.checkpoints.list(trained["id"], after=newest.id).data
    assert older and all(cp.step_number < newest.step_number for cp in older)
    for call in (c.fine_tuning.jobs.list_events, c.fine_tuning.jobs.checkpoints.list):
        with pytest.raises(openai.BadRequestError) as exc:
            call(trained["id"], after="nope")
        assert exc.value.body["param"] == "after"


def test_results_file_has_openai_columns(live, trained):
    c = client(live)
    job = c.fine_tuning.jobs.retrieve(trained["id"])
    text = base64.b64decode(c.files.content(job.result_files[0]).read()).decode()
    header, *lines = text.strip().splitlines()
    assert header == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert len(lines) == 24 and any(line.split(",")[3] for line in lines)  # validation passes are in


def test_checkpoint_ids_answer_chat_completions(live, trained):
    c = client(live)
    ckpt = c.fine_tuning.jobs.checkpoints.list(trained["id"], limit=1).data[0].fine_tuned_model_checkpoint
    reply = c.chat.completions.create(model=ckpt, messages=[{"role": "user", "content": "my card"}], max_tokens=3)
    assert reply.model == ckpt and reply.choices[0].message.content is not None
    with pytest.raises(openai.NotFoundError):
        client(live, "k2").chat.completions.create(model=ckpt, messages=[{"role": "user", "content": "x"}])


def test_models_retrieve_and_delete_own_fine_tunes_only(live, trained):
    c, other = client(live), client(live, "k2")
    name = c.fine_tuning.jobs.retrieve(trained["other"]).fine_tuned_model
    strict(Model, raw(c.models.with_raw_response.retrieve, name))
    strict(Model, raw(c.models.with_raw_response.retrieve, ALIAS))
    for call in (other.models.retrieve, other.models.delete):
        with pytest.raises(openai.NotFoundError):
            call(name)
    with pytest.raises(openai.PermissionDeniedError):
        c.models.delete(live["base"])
    deleted = strict(ModelDeleted, raw(c.models.with_raw_response.delete, name))
    assert deleted.deleted and deleted.id == name
    assert name not in [m.id for m in c.models.list().data]
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("no-such-model")


def test_responses_text_messages_and_limits(live):
    c = client(live)
    body = raw(c.responses.with_raw_response.create, model=ALIAS, input="my card has not arrived",
               instructions="Classify.", max_output_tokens=4, temperature=0)
    resp = strict(Response, body)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage.output_tokens == 4 and resp.usage.input_tokens > 0 and resp.instructions == "Classify."
    typed = c.responses.create(model=live["base"], temperature=0, max_output_tokens=4, input=[
        {"role": "system", "content": "Classify."},
        {"role": "user", "content": [{"type": "input_text", "text": "my card has not arrived"}]}])
    assert typed.output_text == resp.output_text  # the same prompt, greedy
    with pytest.raises(openai.NotFoundError) as exc:  # no such stored response (of this key)
        c.responses.create(model=live["base"], input="x", previous_response_id="resp_1")
    assert exc.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as exc:
        c.responses.create(model=live["base"], input=[{"role": "user", "content": [{"type": "input_image",
                                                                                   "image_url": "x"}]}])
    assert exc.value.body["param"] == "input[0].content[0]"
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="nope", input="x")


def test_responses_stream_openai_events(live):
    c = client(live)
    kinds, deltas = [], []
    with c.responses.stream(model=live["base"], input="my card has not arrived", max_output_tokens=6,
                            temperature=0) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            final = getattr(event, "response", None)
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert "".join(deltas) == final.output_text and final.usage.output_tokens == 6


def test_embeddings_over_the_shipped_encoder(live):
    c = client(live)
    body = raw(c.embeddings.with_raw_response.create, model="all-minilm-l6-v2", encoding_format="float",
               input=["Where is my new card?", "My card has still not arrived", "What is the exchange rate?"])
    emb = strict(CreateEmbeddingResponse, body)
    vectors = np.array([d.embedding for d in emb.data])
    assert vectors.shape == (3, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]  # the two card questions are the nearest pair
    assert emb.usage.prompt_tokens == emb.usage.total_tokens > 3
    # the client's default asks for base64 and decodes it: the same vector
    one = c.embeddings.create(model="text-embedding-3-small", input="Where is my new card?")
    assert np.allclose(one.data[0].embedding, vectors[0], atol=1e-5)
    for bad, param in (({"model": "all-minilm-l6-v2", "input": "x", "dimensions": 8}, "dimensions"),
                       ({"model": "all-minilm-l6-v2", "input": [""]}, "input"),
                       ({"model": "all-minilm-l6-v2", "input": "x", "encoding_format": "int8"}, "encoding_format")):
        with pytest.raises(openai.BadRequestError) as exc:
            c.embeddings.create(**bad)
        assert exc.value.body["param"] == param
    with pytest.raises(openai.NotFoundError):
        c.embeddings.create(model="text-embedding-ada-002", input="x")


def test_bad_job_requests_name_the_param(live, trained):
    c = client(live)
    for kwargs, param in (({"model": "gpt-3.5-turbo"}, "model"),
                          ({"integrations": [{"type": "comet", "comet": {}}]}, "integrations.0.type"),
                          ({"metadata": {"k" * 65: "v"}}, "metadata"),
                          ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
                          ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": "three"}}}},
                           "method.supervised.hyperparameters.n_epochs"),
                          ({"method": {"type": "reinforcement"}}, "method")):  # no grader
        with pytest.raises(openai.BadRequestError) as exc:
            c.fine_tuning.jobs.create(**{"model": live["base"], "training_file": trained["train"], **kwargs})
        assert exc.value.body["param"] == param, exc.value.body


def test_a_job_whose_file_is_gone_fails_with_an_error_not_a_crash(live):
    c = client(live)
    f = c.files.create(file=("t.jsonl", chat_lines(banking_rows(LABELS, 4))), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model=live["base"], training_file=f.id)
    c.files.delete(f.id)
    work(live["data_dir"], once=True)
    job = strict(FineTuningJob, raw(c.fine_tuning.jobs.with_raw_response.retrieve, job.id))
    assert job.status == "failed" and job.error.code == "invalid_training_file" and f.id in job.error.message
    assert job.error.param == "training_file"


def test_model_alias_option_names_a_served_model():
    from tunesmith.errors import ConfigError
    from tunesmith.serve.launch import parse_model_aliases

    assert parse_model_aliases([f"{ALIAS}=base", "text-embedding-3-small=all-minilm-l6-v2"], {"base"}) == {
        ALIAS: "base", "text-embedding-3-small": "all-minilm-l6-v2"}
    for bad in (ALIAS, f"{ALIAS}=elsewhere", "=base"):
        with pytest.raises(ConfigError, match="--model-alias"):
            parse_model_aliases([bad], {"base"})


def test_unsupported_calls_get_the_errors_the_migration_guide_lists(live):
    c = client(live)
    with pytest.raises(openai.NotFoundError):
        c.fine_tuning.checkpoints.permissions.list(fine_tuned_model_checkpoint="ft:x")
    for call, kwargs, param in (
            (c.files.create, {"file": ("b.jsonl", b"{}\n"), "purpose": "assistants"}, "purpose"),
            (c.files.create, {"file": ("b.jsonl", b"{}\n"), "purpose": "batch"}, "file"),  # a line without custom_id
            (c.responses.create, {"model": live["base"], "input": "x", "tools": [{"type": "web_search"}]}, "tools"),
            (c.responses.create, {"model": live["base"], "input": "x", "conversation": "conv_1"}, "conversation"),
            (c.embeddings.create, {"model": "all-minilm-l6-v2", "input": [[1, 2, 3]]}, "input")):
        with pytest.raises(openai.BadRequestError) as exc:
            call(**kwargs)
        assert exc.value.body["param"] == param, exc.value.body


def test_estimated_finish_follows_the_pace_of_the_steps_run():
    import time

    from tunesmith.serve.jobs.events import estimated_finish

    now = time.time()
    assert estimated_finish(now - 10, 0, 10, 30) == pytest.approx(now + 20, abs=2)  # 1 s a step, 20 to go
    assert estimated_finish(now - 10, 20, 25, 30) == pytest.approx(now + 10, abs=2)  # resumed at step 20
    assert estimated_finish(now, 5, 5, 30) is None  # no step run yet: no estimate
