"""The OpenAI-compatible inference routes, driven by the official `openai` client against a live server."""

import openai
import pytest

from tunesmith.serve.app import ServeSettings, create_app
from tunesmith.serve.engines.builtin import Engine

from .conftest import running_server


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """uvicorn on 127.0.0.1 serving the tiny model plus one LoRA adapter named 'ft:tiny:demo:1'."""
    from transformers import AutoModelForCausalLM

    from tunesmith.config import LoraSection
    from tunesmith.models.loading import wrap_adapter

    adapter_dir = tmp_path_factory.mktemp("adapter")
    lora = wrap_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), "lora",
                        LoraSection(r=4, alpha=8, dropout=0.0), seed=1)
    for name, p in lora.named_parameters():  # a non-trivial adapter: B is zero at init
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    lora.save_pretrained(adapter_dir)
    engine = Engine(str(tiny_model_dir), {"ft:tiny:demo:1": adapter_dir}, max_batch=8, wait_ms=30)
    settings = ServeSettings(model=str(tiny_model_dir), api_keys=frozenset({"k1"}), data_dir=tmp_path_factory.mktemp("d"))
    with running_server(create_app(settings, engine)) as url:
        yield {"url": url, "base": str(tiny_model_dir), "engine": engine}


def client(server, key="k1"):
    return openai.OpenAI(base_url=server["url"], api_key=key, max_retries=0)


def test_models_lists_base_and_adapter(server):
    models = list(client(server).models.list())
    assert [m.id for m in models] == [server["base"], "ft:tiny:demo:1"]
    assert [m.model_extra.get("parent") for m in models] == [None, server["base"]]  # an adapter names its base


def test_chat_completion_greedy_is_deterministic_and_counts_tokens(server):
    c = client(server)
    kw = dict(model=server["base"], messages=[{"role": "user", "content": "my card has not arrived"}],
              max_tokens=8, temperature=0)
    a, b = c.chat.completions.create(**kw), c.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.object == "chat.completion" and a.choices[0].finish_reason in ("stop", "length")
    assert a.usage.prompt_tokens > 0 and 0 < a.usage.completion_tokens <= 8
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens


def test_adapter_changes_the_output(server):
    c = client(server)
    msgs = [{"role": "user", "content": "pin blocked"}]
    base = c.chat.completions.create(model=server["base"], messages=msgs, max_tokens=8, temperature=0)
    ft = c.chat.completions.create(model="ft:tiny:demo:1", messages=msgs, max_tokens=8, temperature=0)
    assert base.choices[0].message.content != ft.choices[0].message.content


def test_concurrent_requests_are_batched_with_the_same_results(server):
    from concurrent.futures import ThreadPoolExecutor

    c = client(server)
    prompts = [f"question number {i}" for i in range(6)]
    models = [server["base"], "ft:tiny:demo:1"] * 3

    def ask(args):
        p, m = args
        return c.chat.completions.create(model=m, messages=[{"role": "user", "content": p}], max_tokens=6,
                                         temperature=0).choices[0].message.content

    alone = [ask(a) for a in zip(prompts, models, strict=True)]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(ask, zip(prompts, models, strict=True)))
    assert together == alone


def test_streaming_chat_matches_non_streaming(server):
    c = client(server)
    msgs = [{"role": "user", "content": "exchange rate"}]
    full = c.chat.completions.create(model=server["base"], messages=msgs, max_tokens=10, temperature=0)
    chunks = list(c.chat.completions.create(model=server["base"], messages=msgs, max_tokens=10, temperature=0,
                                            stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_streaming_n_choices_with_usage(server):
    c = client(server)
    msgs = [{"role": "user", "content": "card arrival"}]
    full = c.chat.completions.create(model=server["base"], messages=msgs, max_tokens=8, temperature=0)
    chunks = list(c.chat.completions.create(model=server["base"], messages=msgs, max_tokens=8, temperature=0, n=2,
                                            stream=True, stream_options={"include_usage": True}))
    texts, finished = {0: "", 1: ""}, set()
    for ch in chunks:
        for choice in ch.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert texts == {0: full.choices[0].message.content, 1: full.choices[0].message.content} and finished == {0, 1}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2 * full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_legacy_completions_and_stop_strings(server):
    c = client(server)
    r = c.completions.create(model=server["base"], prompt="card", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens <= 12
    text = r.choices[0].text
    if len(text) > 2:
        stop = text[1:3]
        cut = c.completions.create(model=server["base"], prompt="card", max_tokens=12, temperature=0, stop=[stop])
        assert stop not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"


def test_errors_unknown_model_and_bad_key(server):
    with pytest.raises(openai.NotFoundError) as exc:
        client(server).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert exc.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(model=server["base"], messages=[])


def test_message_without_content_is_refused_in_openais_shape(server):
    c = client(server)
    for msgs in ([{"role": "user", "content": None}], [{"role": "system", "content": None}, {"role": "user", "content": "x"}],
                 [{"role": "user"}]):
        with pytest.raises(openai.BadRequestError) as exc:
            c.chat.completions.create(model=server["base"], messages=msgs, max_tokens=2)
        err = exc.value.body
        assert exc.value.status_code == 400 and err["type"] == "invalid_request_error"
        assert err["param"].startswith("messages.") and err["param"].endswith(".content") and "null" in err["message"]
    # an assistant turn that called a tool may come without content, as at OpenAI
    ok = c.chat.completions.create(model=server["base"], max_tokens=2, temperature=0, messages=[
        {"role": "user", "content": "x"}, {"role": "assistant", "content": None}, {"role": "user", "content": "y"}])
    assert ok.choices[0].finish_reason in ("stop", "length")
