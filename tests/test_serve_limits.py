"""What a server exposed to several keys must hold, through the official `openai` client on loopback:
bounded requests, continuous batching, 4xx (never 500) for bad input, checks at job creation, no
server paths in job errors, and a bounded SIGTERM."""

import base64
import json
import shutil
import signal
import threading
import time
from pathlib import Path

import openai
import pytest

from tunesmith.serve.app import ServeSettings, create_app
from tunesmith.serve.engines.builtin import Engine
from tunesmith.serve.jobs.store import JobStore
from tunesmith.serve.jobs.worker import announce_start, job_error, work
from tunesmith.serve.store import Store
from tunesmith.serve.store.keys import owner_id, server_secret

from .conftest import http_get, running_server
from .test_serve_jobs import chat_jsonl
from .test_serve_server_kill import _free_port, _start, _worker_pids

LONG_CONTEXT = 65_536


@pytest.fixture(scope="module")
def long_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with a long context, so that one request can run for many seconds."""
    folder = tmp_path_factory.mktemp("tiny-long") / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"max_position_embeddings": LONG_CONTEXT}))
    return folder


@pytest.fixture(scope="module")
def live(tiny_model_dir, long_model_dir, tmp_path_factory):
    """Two servers on 127.0.0.1 with keys k1 and k2: the tiny model (context 512) and its long-context copy."""
    tiny = Engine(str(tiny_model_dir), {}, max_batch=8, wait_ms=5)
    long = Engine(str(long_model_dir), {}, max_batch=8, wait_ms=5)
    keys = frozenset({"k1", "k2"})
    tiny_settings = ServeSettings(model=str(tiny_model_dir), api_keys=keys, data_dir=tmp_path_factory.mktemp("d1"))
    long_settings = ServeSettings(model=str(long_model_dir), api_keys=keys, data_dir=tmp_path_factory.mktemp("d2"),
                                  max_tokens=LONG_CONTEXT)
    with running_server(create_app(tiny_settings, tiny)) as url, \
            running_server(create_app(long_settings, long)) as long_url:
        yield {"url": url, "base": str(tiny_model_dir), "data_dir": tiny_settings.data_dir, "long_url": long_url,
               "long": str(long_model_dir), "long_engine": long}


def client(url, key="k1", **kw):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, **kw)


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# --- request limits ----------------------------------------------------------------------------


def test_huge_max_tokens_is_capped_to_the_context_left(live):
    r = client(live["url"]).completions.create(model=live["base"], prompt="card", max_tokens=10**9, temperature=0)
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= 512
    if r.choices[0].finish_reason == "length":  # it ran to the cap: exactly the context left
        assert r.usage.prompt_tokens + r.usage.completion_tokens == 512


def test_prompt_past_the_context_is_400_naming_both_numbers(live):
    words = " ".join(["card arrival pin"] * 200)  # about 600 tokens for a 512-token model
    with pytest.raises(openai.BadRequestError) as exc:
        client(live["url"]).chat.completions.create(model=live["base"], messages=[{"role": "user", "content": words}])
    err = exc.value.body
    assert err["code"] == "context_length_exceeded" and "512" in err["message"]
    prompt_tokens = int(err["message"].split("the prompt has ")[1].split()[0])
    assert prompt_tokens > 512
    t0 = time.monotonic()
    with pytest.raises(openai.BadRequestError) as exc:  # 50k characters: refused before tokenizing
        client(live["url"]).chat.completions.create(model=live["base"], messages=[{"role": "user", "content": "a" * 50_000}])
    assert exc.value.body["code"] == "context_length_exceeded" and time.monotonic() - t0 < 5


@pytest.mark.parametrize("extra", [{"stop": ["a", "b", "c", "d", "e"]}, {"n": 9}, {"max_tokens": 0}])
def test_request_bounds_are_400(live, extra):
    with pytest.raises(openai.BadRequestError) as exc:
        client(live["url"]).chat.completions.create(model=live["base"], messages=[{"role": "user", "content": "x"}],
                                                    **extra)
    assert exc.value.body["type"] == "invalid_request_error" and exc.value.body["param"]


def test_short_request_is_not_held_behind_a_long_one(live):
    """Continuous batching: a 16-token request sent while a long one runs finishes long before it."""
    c, engine = client(live["long_url"], timeout=300), live["long_engine"]
    finished: dict = {}

    def long_request():
        r = c.completions.create(model=live["long"], prompt="card", max_tokens=3000, temperature=0)
        finished["long"] = time.monotonic()
        finished["long_tokens"] = r.usage.completion_tokens

    thread = threading.Thread(target=long_request)
    thread.start()
    assert wait_for(lambda: engine.active and len(engine.active[0].generated) > 50, 30)
    t0 = time.monotonic()
    short = c.chat.completions.create(model=live["long"], messages=[{"role": "user", "content": "pin"}], max_tokens=16,
                                      temperature=0)
    short_done = time.monotonic()
    thread.join(300)
    assert short.usage.completion_tokens <= 16
    assert finished["long_tokens"] > 1000, "the long request ended early; pick another prompt"
    assert short_done < finished["long"], "the short request waited for the long one"
    assert short_done - t0 < 10


def test_client_that_leaves_stops_its_generation(live):
    engine = live["long_engine"]
    assert wait_for(lambda: not engine.active, 60)
    with pytest.raises(openai.APITimeoutError):
        client(live["long_url"], timeout=1.0).completions.create(model=live["long"], prompt="card", max_tokens=20_000,
                                                                 temperature=0)
    assert wait_for(lambda: not engine.active, 3), "generation went on after the client left"
    stream = client(live["long_url"]).chat.completions.create(
        model=live["long"], messages=[{"role": "user", "content": "card"}], max_tokens=20_000, temperature=0,
        stream=True)
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()
    assert wait_for(lambda: not engine.active, 3), "a stream went on after the client closed it"


def test_fine_tuned_models_are_private_to_their_key(live):
    """A model made by key k1's job: k2 neither lists it nor uses it; base models stay public."""
    c = client(live["url"])
    f = c.files.create(file=("t.jsonl", chat_jsonl(8)), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model=live["base"], training_file=f.id, suffix="mine", method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 8}}})
    work(live["data_dir"], once=True)
    name = c.fine_tuning.jobs.retrieve(job.id).fine_tuned_model
    assert name and name in [m.id for m in c.models.list().data]
    other = client(live["url"], "k2")
    assert [m.id for m in other.models.list().data] == [live["base"]]
    for call in (lambda: other.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}]),
                 lambda: other.completions.create(model=name, prompt="x")):
        with pytest.raises(openai.NotFoundError) as exc:
            call()
        body = exc.value.body
        assert body["code"] == "model_not_found" and job.id not in body["message"].split("Available:")[1]
    assert c.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}], max_tokens=2).choices


# --- uploads and job creation --------------------------------------------------------------------

BAD_UPLOADS = {
    "empty": b"",
    "whitespace": b"  \n\n\t \n",
    "not utf-8": b'{"messages": []}\n\xff\xfe\xfd\n',
    "png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)),
    "latin-1 line": '{"messages": [{"role": "user", "content": "café"}, {"role": "assistant", "content": "ok"}]}\n'
                    .encode("latin-1"),
    "role is a list": b'{"messages": [{"role": ["user"], "content": "hi"}, {"role": "assistant", "content": "ok"}]}\n',
    "call never answered": b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": null, '
                           b'"tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", '
                           b'"arguments": "{}"}}]}, {"role": "user", "content": "and?"}, '
                           b'{"role": "assistant", "content": "ok"}]}\n',
    "not an object": b'["messages"]\n',
    "messages not a list": b'{"messages": {"role": "user"}}\n',
}


@pytest.mark.parametrize("kind", BAD_UPLOADS)
def test_every_malformed_upload_is_400_invalid_file_format(live, kind):
    with pytest.raises(openai.BadRequestError) as exc:
        client(live["url"]).files.create(file=("bad.jsonl", BAD_UPLOADS[kind]), purpose="fine-tune")
    body = exc.value.body
    assert body["code"] == "invalid_file_format" and body["type"] == "invalid_request_error", body
    assert str(live["data_dir"]) not in body["message"] and "/tmp" not in body["message"]
    if kind in ("not utf-8", "latin-1 line", "role is a list", "call never answered"):
        assert "line" in body["message"], body["message"]


@pytest.mark.parametrize(("hyper", "param"), [
    ({"n_epochs": 0}, "n_epochs"), ({"n_epochs": -1}, "n_epochs"), ({"n_epochs": 1000}, "n_epochs"),
    ({"batch_size": 0}, "batch_size"), ({"learning_rate_multiplier": -0.5}, "learning_rate_multiplier"),
    ({"learning_rate_multiplier": 0}, "learning_rate_multiplier"),
])
def test_bad_hyperparameters_are_400_at_creation(live, hyper, param):
    c = client(live["url"])
    f = c.files.create(file=("t.jsonl", chat_jsonl(4)), purpose="fine-tune")
    before = len(c.fine_tuning.jobs.list().data)
    with pytest.raises(openai.BadRequestError) as exc:
        c.fine_tuning.jobs.create(model=live["base"], training_file=f.id, method={
            "type": "supervised", "supervised": {"hyperparameters": hyper}})
    assert exc.value.body["param"] == f"method.supervised.hyperparameters.{param}"
    with pytest.raises(openai.BadRequestError) as exc:  # the older top-level form
        c.fine_tuning.jobs.create(model=live["base"], training_file=f.id, hyperparameters=hyper)
    assert exc.value.body["param"] == f"hyperparameters.{param}"
    assert len(c.fine_tuning.jobs.list().data) == before  # nothing was created


def test_file_format_must_match_the_method(live):
    c = client(live["url"])
    chat = c.files.create(file=("chat.jsonl", chat_jsonl(4)), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as exc:
        c.fine_tuning.jobs.create(model=live["base"], training_file=chat.id, method={"type": "dpo"})
    assert exc.value.body["param"] == "training_file" and "preference" in exc.value.body["message"]
    pair = {"input": {"messages": [{"role": "user", "content": "hi"}]},
            "preferred_output": [{"role": "assistant", "content": "hello"}],
            "non_preferred_output": [{"role": "assistant", "content": "go away"}]}
    dpo = c.files.create(file=("dpo.jsonl", (json.dumps(pair) + "\n").encode()), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as exc:
        c.fine_tuning.jobs.create(model=live["base"], training_file=dpo.id)
    assert exc.value.body["param"] == "training_file" and "chat" in exc.value.body["message"]


def test_job_errors_never_show_server_paths_or_exception_names(live):
    c = client(live["url"])
    f = c.files.create(file=("t.jsonl", chat_jsonl(4)), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model=live["base"], training_file=f.id)
    store = JobStore(Store(live["data_dir"]))
    owner = owner_id(server_secret(live["data_dir"]), "k1")  # the store keeps owner ids, never keys
    storage = Path(store.get_file(f.id, owner)["storage"])
    storage.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")  # changed on disk
    work(live["data_dir"], once=True)
    failed = c.fine_tuning.jobs.retrieve(job.id)
    assert failed.status == "failed"
    assert f.id in failed.error.message and "line 1" in failed.error.message
    events = " ".join(e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=100).data)
    for text in (failed.error.message, events):
        assert str(live["data_dir"]) not in text and "files/" not in text and "Error" not in text
    unexpected = job_error(KeyError(str(storage)), store, store.get_job(job.id, owner))
    assert unexpected["code"] == "server_error" and str(storage) not in unexpected["message"]
    assert "KeyError" not in unexpected["message"]


def test_restart_without_checkpoint_says_so_and_supersedes_old_steps(tmp_path):
    store = JobStore(Store(tmp_path))
    job = store.add_job("k", model="m", training_file="file-x", validation_file=None, suffix=None, seed=1,
                        method={"type": "supervised"}, metadata=None)
    store.update_job(job["id"], status="running")
    for step in (1, 2, 3):
        store.add_event(job["id"], f"Step {step}", "metrics", {"step": step, "train_loss": 1.0},
                        dedup_key=f"metrics:train:{step}")
    assert announce_start(store, store.get_job(job["id"], "k"), tmp_path / "none") is False
    events = store.events(job["id"])
    assert any("restarted from step 0" in e["message"] for e in events)
    assert not [e for e in events if e["type"] == "metrics"]  # the new run reports each step again, once
    (tmp_path / "ck" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "ck" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    for step in (1, 2, 3):
        store.add_event(job["id"], f"Step {step}", "metrics", {"step": step}, dedup_key=f"metrics:train:{step}")
    assert announce_start(store, store.get_job(job["id"], "k"), tmp_path / "ck") == tmp_path / "ck" / "checkpoint-2"
    steps = sorted(e["data"]["step"] for e in store.events(job["id"]) if e["type"] == "metrics")
    assert steps == [1, 2]


# --- the API surface ---------------------------------------------------------------------------------


def test_docs_are_off_with_keys_and_errors_have_openai_shape(live):
    root = live["url"].removesuffix("/v1")
    for path, key, expected in (("/docs", None, 404), ("/openapi.json", None, 404), ("/v1/nothing-here", "k1", 404),
                                ("/v1/nothing-here", None, 401)):  # no key: 401 before the route is looked up
        status, body = http_get(root + path, key)
        assert status == expected and set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    settings = ServeSettings(model=live["base"], api_keys=frozenset({"k"}), docs=True, data_dir=live["data_dir"])
    assert create_app(settings, engine=object()).openapi_url == "/openapi.json"
    assert create_app(ServeSettings(model=live["base"], data_dir=live["data_dir"]), engine=object()).docs_url == "/docs"


def test_results_file_is_base64_like_openai(live):
    c = client(live["url"])
    job = next(j for j in c.fine_tuning.jobs.list().data if j.status == "succeeded")
    raw = c.files.content(job.result_files[0]).read()
    assert base64.b64decode(raw, validate=True).decode().startswith("step,train_loss")


# --- shutdown ------------------------------------------------------------------------------------------


def test_sigterm_with_a_request_in_flight_exits_within_the_bound(tmp_path, long_model_dir):
    data_dir, port = tmp_path / "data", _free_port()
    with open(tmp_path / "serve.log", "w") as log:
        server = _start(long_model_dir, data_dir, port, log)
        try:
            c = client(f"http://127.0.0.1:{port}/v1", "k", timeout=120)
            f = c.files.create(file=("t.jsonl", chat_jsonl(32)), purpose="fine-tune")
            job_id = c.fine_tuning.jobs.create(model=str(long_model_dir), training_file=f.id, method={
                "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 4}}}).id
            assert wait_for(lambda: any(e.type == "metrics" for e in c.fine_tuning.jobs.list_events(job_id).data), 120)
            outcome: dict = {}

            def stuck():
                try:
                    c.completions.create(model=str(long_model_dir), prompt="card", max_tokens=60_000, temperature=0)
                    outcome["result"] = "finished"
                except openai.APIError as exc:
                    outcome["result"] = getattr(exc, "status_code", None) or type(exc).__name__

            thread = threading.Thread(target=stuck)
            thread.start()
            time.sleep(3)  # the request is generating
            assert "result" not in outcome
            t0 = time.monotonic()
            server.send_signal(signal.SIGTERM)
            server.wait(60)
            took = time.monotonic() - t0
            thread.join(30)
        finally:
            if server.poll() is None:
                server.kill()
    assert took < 15, f"SIGTERM took {took:.1f} s"
    assert outcome["result"] != "finished", "the request was not interrupted"
    assert not _worker_pids(data_dir), "the worker outlived the server"
    store = JobStore(Store(data_dir))
    job = store.get_job(job_id, owner_id(server_secret(data_dir), "k"))
    saved = [e["message"] for e in store.events(job_id) if "saved at step" in e["message"]]
    assert job["status"] == "running" and saved, "the worker did not stop at a step with a checkpoint"
    step = int(saved[0].split("saved at step ")[1].split()[0])
    assert any(c["step_number"] == step for c in store.checkpoints(job_id))


def test_batch_stays_within_its_cache_budget_and_answers_everyone(tiny_model_dir):
    """Rows that would push the KV cache past max_batch_tokens wait at the head of the line."""
    import asyncio

    from tunesmith.serve.engines.interface import GenParams

    engine = Engine(str(tiny_model_dir), {}, max_batch=8, wait_ms=5, max_batch_tokens=100)
    cells: list[int] = []
    rows: list[int] = []
    step = engine.batch._decode_step

    def recording_step():
        rows.append(len(engine.active))
        cells.append(len(engine.active) * (engine.batch.mask.shape[1] + 1))
        return step()

    engine.batch._decode_step = recording_step
    prompt = engine.text_prompt_ids("my card has not arrived and the pin is blocked " * 2)

    async def ask_all():
        return await asyncio.gather(*(engine.submit(engine.base_name, prompt, [GenParams(12, 0.0)]).results()
                                      for _ in range(6)))

    answers = asyncio.run(ask_all())
    engine.close()
    assert len(answers) == 6 and all(a[0].completion_tokens >= 1 for a in answers)
    assert max(cells) <= 100, cells  # within the budget up to the last token
    assert 1 < max(rows) < 6  # batched, but some rows waited for others to leave
