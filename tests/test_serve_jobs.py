"""Files and fine-tuning jobs through the official `openai` client against a live server and worker."""

import base64
import json
import threading
import time

import openai
import pytest

from tunesmith.serve.app import ServeSettings, create_app
from tunesmith.serve.engines.builtin import Engine
from tunesmith.serve.jobs.worker import work

from .conftest import banking_rows, chat_lines, http_get, running_server

LABELS = ("card_arrival", "pin_blocked", "age_limit")


def chat_jsonl(n: int) -> bytes:
    return chat_lines(banking_rows(LABELS, 12)[:n])


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("serve-data")
    engine = Engine(str(tiny_model_dir), {}, wait_ms=5)
    settings = ServeSettings(model=str(tiny_model_dir), api_keys=frozenset({"k1", "k2"}), data_dir=data_dir,
                             max_upload_mb=1)
    with running_server(create_app(settings, engine)) as url:
        yield {"url": url, "base": str(tiny_model_dir), "data_dir": data_dir}


def client(live, key="k1"):
    return openai.OpenAI(base_url=live["url"], api_key=key, max_retries=0)


def test_bad_jsonl_is_refused_with_error_kinds(live):
    bad = b'{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n'
    with pytest.raises(openai.BadRequestError) as exc:
        client(live).files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    message = exc.value.body["message"]
    assert "missing_assistant_message" in message or "no_assistant_messages" in message
    assert "line" in message


def test_oversize_upload_is_413(live):
    with pytest.raises(openai.APIStatusError) as exc:
        client(live).files.create(file=("big.jsonl", b"x" * (1024 * 1024 + 10)), purpose="fine-tune")
    assert exc.value.status_code == 413


def test_files_are_private_to_their_key(live):
    f = client(live).files.create(file=("train.jsonl", chat_jsonl(10)), purpose="fine-tune")
    assert client(live).files.retrieve(f.id).filename == "train.jsonl"
    assert f.id in [x.id for x in client(live).files.list().data]
    with pytest.raises(openai.NotFoundError):
        client(live, "k2").files.retrieve(f.id)
    assert f.id not in [x.id for x in client(live, "k2").files.list().data]
    with pytest.raises(openai.NotFoundError):
        client(live).files.retrieve("../../etc/passwd")
    assert client(live).files.content(f.id).read() == chat_jsonl(10)
    assert client(live).files.delete(f.id).deleted
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live["url"], api_key="nope", max_retries=0).files.list()


def test_job_lifecycle_to_a_servable_model(live):
    c = client(live)
    train = c.files.create(file=("train.jsonl", chat_jsonl(30)), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model=live["base"], training_file=train.id, suffix="banking", seed=3,
                                    method={"type": "supervised", "supervised": {"hyperparameters": {
                                        "n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 20}}})
    assert job.status == "queued" and job.object == "fine_tuning.job"
    with pytest.raises(openai.NotFoundError):
        client(live, "k2").fine_tuning.jobs.retrieve(job.id)
    work(live["data_dir"], once=True)
    job = c.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{live['base']}:banking:{job.id}" and job.trained_tokens > 0
    events = c.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e for e in events if e.type == "metrics" and "train_loss" in (e.data or {})]
    assert len(metrics) == 8 and {e.data["step"] for e in metrics} == set(range(1, 9))
    assert events[0].message == "The job has successfully completed"
    assert [cp.step_number for cp in c.fine_tuning.jobs.checkpoints.list(job.id).data][:1] == [8]
    # OpenAI returns the results file base64-encoded; the cookbook decodes it with base64.b64decode
    csv_text = base64.b64decode(c.files.content(job.result_files[0]).read()).decode()
    header, *lines = csv_text.strip().splitlines()
    assert header == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy" and len(lines) == 8
    losses = [float(x.split(",")[1]) for x in lines]
    assert losses[-1] < losses[0]
    assert job.fine_tuned_model in [m.id for m in c.models.list().data]
    # the model belongs to the key whose job made it: another key neither lists nor uses it
    other = client(live, "k2")
    assert job.fine_tuned_model not in [m.id for m in other.models.list().data]
    with pytest.raises(openai.NotFoundError) as exc:
        other.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "x"}])
    assert exc.value.body["code"] == "model_not_found"
    # trained_tokens: the file's tokens by the cookbook rule (the data validator's count), times the epochs
    from tunesmith.data.formats.validate import token_counter, validate_chat

    path = live["data_dir"] / "t.jsonl"
    path.write_bytes(chat_jsonl(30))
    assert job.trained_tokens == 2 * sum(validate_chat(path, token_counter(live["base"])).tokens)
    reply = c.chat.completions.create(model=job.fine_tuned_model, messages=[
        {"role": "system", "content": "Classify."}, {"role": "user", "content": "my card still has not arrived"}],
        max_tokens=6, temperature=0)
    assert reply.choices[0].message.content is not None
    page = c.fine_tuning.jobs.list(limit=1)
    assert page.data[0].id == job.id
    status, body = http_get(f"{live['url']}/fine_tuning/jobs/{job.id}/report", "k1")
    assert status == 404 and "validation_file" in json.loads(body)["error"]["message"]  # none was given


def test_cancel_stops_a_running_job_within_a_step(live):
    c = client(live)
    train = c.files.create(file=("train.jsonl", chat_jsonl(36)), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model=live["base"], training_file=train.id, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 25, "batch_size": 4}}})
    worker = threading.Thread(target=work, args=(live["data_dir"],), kwargs={"once": True}, daemon=True)
    worker.start()
    deadline = time.time() + 120
    while time.time() < deadline:
        steps = [e for e in c.fine_tuning.jobs.list_events(job.id, limit=1000).data if e.type == "metrics"]
        if steps:
            break
        time.sleep(0.1)
    assert c.fine_tuning.jobs.cancel(job.id).id == job.id
    seen_at_cancel = max(e.data["step"] for e in steps)
    worker.join(120)
    job = c.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    last = max(e.data["step"] for e in c.fine_tuning.jobs.list_events(job.id, limit=1000).data if e.type == "metrics")
    assert last <= seen_at_cancel + 2 and last < 25 * 9
