"""`tunesmith serve --engine vllm`: tunesmith's API in front of a real vLLM server (vLLM's CPU build, `make vllm`)
on the embedded SmolLM2-135M-Instruct. Each test skips with what to run when vLLM or the model is absent.

The same requests go to the built-in engine for comparison: greedy answers must agree character for character,
with the base model and with an adapter a job trained."""

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from openai.types.chat import ChatCompletion

from tunesmith.serve.app import ServeSettings, create_app
from tunesmith.serve.engine import Engine, GenParams
from tunesmith.serve.errors import APIError
from tunesmith.serve.store import Store
from tunesmith.serve.worker import work

from .conftest import EMBEDDED, REPO, banking_rows, running_server, vllm_engine, vllm_or_skip

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
QUESTIONS = [r["text"] for r in banking_rows(("card_arrival", "pin_blocked", "age_limit"), 3)]
SYSTEM = "Classify the customer message. Answer with one label: card_arrival, pin_blocked, age_limit."


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """tunesmith on vLLM (keys k1, k2) and tunesmith on the built-in engine, over the same model."""
    vllm_or_skip()
    data_dir = tmp_path_factory.mktemp("vllm-serve")
    with vllm_engine(data_dir / "vllm") as engine:
        settings = ServeSettings(model=EMBEDDED, api_keys=frozenset({"k1", "k2"}), data_dir=data_dir, engine="vllm")
        builtin = Engine(EMBEDDED, {}, wait_ms=5)
        builtin_settings = ServeSettings(model=EMBEDDED, data_dir=tmp_path_factory.mktemp("builtin-serve"))
        with running_server(create_app(settings, engine)) as url, \
                running_server(create_app(builtin_settings, builtin)) as builtin_url:
            yield {"url": url, "engine": engine, "data_dir": data_dir, "builtin_url": builtin_url, "builtin": builtin}


def client(url: str, key: str = "k1") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=300)


def greedy(url: str, model: str, questions: list[str], key: str = "k1") -> list[str]:
    c = client(url, key)
    return [c.chat.completions.create(model=model, temperature=0, max_tokens=40, messages=[
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]).choices[0].message.content
            for q in questions]


def vllm_models(engine) -> set[str]:
    """The model ids vLLM itself serves (asked directly, with tunesmith's private key)."""
    r = httpx.get(f"{engine.server.url}/v1/models", headers=engine.server.headers, timeout=30)
    return {m["id"] for m in r.json()["data"]}


def test_greedy_answers_match_the_builtin_engine(served):
    assert greedy(served["url"], EMBEDDED, QUESTIONS) == greedy(served["builtin_url"], EMBEDDED, QUESTIONS, key="any")


def test_stream_n_seed_stop_and_logprobs_pass_through(served):
    c = client(served["url"])
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = c.chat.completions.create(model=EMBEDDED, messages=messages, temperature=0, max_tokens=30)
    chunks = list(c.chat.completions.create(model=EMBEDDED, messages=messages, temperature=0, max_tokens=30,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    def sampled():
        reply = c.chat.completions.create(model=EMBEDDED, messages=messages, temperature=1.0, max_tokens=20, n=3,
                                          seed=7)
        return [ch.message.content for ch in reply.choices]

    first = sampled()
    assert len(first) == 3 and first == sampled()  # seeded: the same draws again
    assert len(set(first)) > 1  # each choice its own seed
    text = whole.choices[0].message.content
    cut = text.split()[1]
    stopped = c.chat.completions.create(model=EMBEDDED, messages=messages, temperature=0, max_tokens=30, stop=[cut])
    assert stopped.choices[0].message.content == text[: text.index(cut)]
    raw = c.chat.completions.with_raw_response.create(model=EMBEDDED, messages=messages, temperature=0, max_tokens=8,
                                                      logprobs=True, top_logprobs=2)
    reply = ChatCompletion.model_validate_json(raw.text)
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-4 for t in content)


def test_vllm_errors_become_openai_errors(served):
    engine = served["engine"]

    async def ask(model: str):
        return await engine.submit(model, engine.text_prompt_ids("Hello"), [GenParams(4)]).results()

    with pytest.raises(APIError) as err:  # a model id vLLM does not know (the routes never send one)
        asyncio.run(ask("no-such-adapter"))
    assert err.value.status == 404 and "no-such-adapter" in err.value.body["message"]
    assert err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):  # through the API, the ownership check answers first
        client(served["url"]).chat.completions.create(model="no-such-adapter", messages=[{"role": "user", "content": "x"}])


def test_a_jobs_fine_tune_is_served_by_vllm_to_its_owner_only(served):
    c = client(served["url"])
    upload = c.files.create(file=open(REPO / "examples" / "data" / "banking_chat_12.jsonl", "rb"), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model=EMBEDDED, training_file=upload.id, suffix="vllm", method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 4}}})
    work(served["data_dir"], once=True)
    job = c.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    name, engine = job.fine_tuned_model, served["engine"]
    succeeded = time.monotonic()
    while name not in vllm_models(engine):  # loaded by the server's watcher, before anyone asks for it
        assert time.monotonic() - succeeded < 60, "the fine-tune did not reach vLLM within a minute"
        time.sleep(1)
    run_dir = Store(served["data_dir"]).job_by_model(name)["run_dir"]
    served["builtin"].add_adapter(name, Path(run_dir) / "train" / "adapter")
    assert greedy(served["url"], name, QUESTIONS) == greedy(served["builtin_url"], name, QUESTIONS, key="any")
    with pytest.raises(openai.NotFoundError):
        client(served["url"], "k2").chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}])
    assert name not in [m.id for m in client(served["url"], "k2").models.list()]
    c.models.delete(name)
    assert name not in vllm_models(engine)


def test_a_killed_vllm_fails_the_stream_then_is_restarted(served):
    engine, c = served["engine"], client(served["url"])
    stream = c.chat.completions.create(model=EMBEDDED, stream=True, max_tokens=2000, temperature=0,
                                       messages=[{"role": "user", "content": "Count from 1 to 500, one per line."}])
    with pytest.raises(openai.APIError):
        for i, _ in enumerate(stream):
            if i == 3:
                os.killpg(engine.server.proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 600
    while engine.server.restarts == 0 or not engine.server.ready.is_set():
        assert time.monotonic() < deadline, f"vLLM was not restarted; its log: {engine.server.log_path}"
        time.sleep(2)
    assert greedy(served["url"], EMBEDDED, QUESTIONS[:1]) == greedy(served["builtin_url"], EMBEDDED, QUESTIONS[:1], key="any")
    assert "tunesmith starts vLLM" in (served["data_dir"] / "vllm" / "vllm.log").read_text()


def test_a_forced_tool_call_decodes_under_vllms_structured_outputs(served):
    import json

    tools = [{"type": "function", "function": {"name": "report_card", "parameters": {
        "type": "object", "properties": {"reason": {"type": "string", "enum": ["lost", "stolen"]}},
        "required": ["reason"]}}}]
    reply = client(served["url"]).chat.completions.create(
        model=EMBEDDED, tools=tools, tool_choice={"type": "function", "function": {"name": "report_card"}},
        messages=[{"role": "user", "content": "someone stole my card"}], temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "report_card"
    assert json.loads(call.function.arguments)["reason"] in ("lost", "stolen")
