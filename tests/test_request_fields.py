"""Nothing dropped in silence: every field of the official client's request types (chat completions, completions,
Responses, embeddings) is decided in tunesmith.serve.plan.fields; a live server (the tiny model) honours each
served value and answers each unserved one with a 400 naming it; an unknown field is refused as OpenAI refuses it."""

import typing
from pathlib import Path

import openai
import pytest
from openai.types import completion_create_params, embedding_create_params
from openai.types.chat import completion_create_params as chat_params
from openai.types.responses import response_create_params

from tunesmith.serve.app import ServeSettings, create_app
from tunesmith.serve.engines.builtin import Engine
from tunesmith.serve.plan.fields import TABLES, markdown_tables

from .conftest import running_server

ROOT = Path(__file__).resolve().parents[1]
CLIENT_TYPES = {
    "chat.completions": (chat_params.CompletionCreateParamsNonStreaming, chat_params.CompletionCreateParamsStreaming),
    "completions": (completion_create_params.CompletionCreateParamsNonStreaming,
                    completion_create_params.CompletionCreateParamsStreaming),
    "responses": (response_create_params.ResponseCreateParamsNonStreaming,
                  response_create_params.ResponseCreateParamsStreaming),
    "embeddings": (embedding_create_params.EmbeddingCreateParams,),
}
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
# a served value of every field that is not plain sampling (sent alone, beside the required ones)
SERVED = {
    "chat.completions": {
        "n": 2, "seed": 1, "stop": ["zz"], "temperature": 0, "top_p": 0.5, "frequency_penalty": 0.5,
        "presence_penalty": 0.5, "logit_bias": {"5": 2.0}, "user": "u1", "prompt_cache_key": "k",
        "prompt_cache_retention": "24h", "prompt_cache_options": {}, "safety_identifier": "s", "service_tier": "auto",
        "max_tokens": 2, "max_completion_tokens": 2, "logprobs": True, "response_format": {"type": "text"},
        "tools": [TOOL], "tool_choice": "none", "parallel_tool_calls": False, "metadata": {"a": "b"}, "store": False,
        "modalities": ["text"], "verbosity": "medium"},
    "completions": {"n": 2, "seed": 1, "stop": "zz", "temperature": 0, "top_p": 0.5, "frequency_penalty": 1,
                    "presence_penalty": 1, "logit_bias": {"5": -100}, "user": "u1", "logprobs": 2, "echo": True,
                    "best_of": 1, "max_tokens": 2},
    "responses": {"instructions": "Be brief.", "max_output_tokens": 2, "metadata": {"a": "b"}, "store": False,
                  "text": {"format": {"type": "text"}, "verbosity": "medium"}, "tools": [
                      {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}],
                  "tool_choice": "none", "parallel_tool_calls": False, "max_tool_calls": 1,
                  "include": ["message.output_text.logprobs"], "top_logprobs": 2, "temperature": 0, "top_p": 0.5,
                  "user": "u1", "prompt_cache_key": "k", "prompt_cache_retention": "in_memory",
                  "prompt_cache_options": {}, "safety_identifier": "s", "service_tier": "default",
                  "truncation": "disabled", "background": False},
    "embeddings": {"encoding_format": "float", "user": "u1"},
}
# fields whose served values need the server's state or a stream: tested in their own tests
ELSEWHERE = {"model", "messages", "prompt", "input", "stream", "stream_options", "top_logprobs",
             "previous_response_id", "dimensions"}


def declared(endpoint: str) -> set[str]:
    return set().union(*(typing.get_type_hints(t) for t in CLIENT_TYPES[endpoint]))


@pytest.mark.parametrize("endpoint", list(CLIENT_TYPES))
def test_every_field_of_the_clients_request_types_is_decided(endpoint):
    """A field the client declares and the table does not decide (a newer client) fails here, and so does a
    decision about a field the client no longer sends."""
    fields = declared(endpoint)
    assert fields - set(TABLES[endpoint]) == set(), f"decide these {endpoint} fields in serve/plan/fields.py"
    assert set(TABLES[endpoint]) - fields == set()


def test_docs_table_is_current():
    text = (ROOT / "docs" / "serve.md").read_text(encoding="utf-8")
    start, end = "<!-- request-fields:start -->\n", "<!-- request-fields:end -->"
    assert text[text.index(start) + len(start): text.index(end)] == markdown_tables(), (
        "docs/serve.md's parameter tables are out of date: paste tunesmith.serve.plan.fields.markdown_tables()")


@pytest.fixture(scope="module")
def client(tiny_model_dir, tmp_path_factory):
    engine = Engine(str(tiny_model_dir), {}, wait_ms=5)
    settings = ServeSettings(model=str(tiny_model_dir), data_dir=tmp_path_factory.mktemp("fields"))
    with running_server(create_app(settings, engine)) as url:
        yield openai.OpenAI(base_url=url, api_key="none", max_retries=0), str(tiny_model_dir)


def call(client, endpoint: str, **fields):
    c, model = client
    if endpoint == "chat.completions":
        return c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                         **{"max_tokens": 2, **fields})
    if endpoint == "completions":
        return c.completions.create(model=model, prompt="hi", **{"max_tokens": 2, **fields})
    if endpoint == "responses":
        return c.responses.create(model=model, input="hi", **{"max_output_tokens": 2, **fields})
    return c.embeddings.create(model="all-minilm-l6-v2", input="hi", **fields)


@pytest.mark.parametrize("endpoint", list(CLIENT_TYPES))
def test_each_field_is_honoured_or_a_400_naming_it(client, endpoint):
    table = TABLES[endpoint]
    unserved = {name for name, rule in table.items() if rule.serves is not None}
    assert set(SERVED[endpoint]) | unserved | ELSEWHERE >= set(table), "give a served value for each new field"
    for name, value in SERVED[endpoint].items():
        call(client, endpoint, **{name: value})  # no 400
    for name in sorted(unserved):
        value = ["message.input_image.image_url"] if name == "include" else "unserved"
        with pytest.raises(openai.BadRequestError) as exc:
            call(client, endpoint, **{name: value})
        assert exc.value.body["param"] == name and name in exc.value.body["message"], exc.value.body


@pytest.mark.parametrize("endpoint", list(CLIENT_TYPES))
def test_an_unknown_field_is_refused_as_openai_refuses_it(client, endpoint):
    with pytest.raises(openai.BadRequestError) as exc:
        call(client, endpoint, extra_body={"frobnicate": 1})
    assert exc.value.body["message"] == "Unrecognized request argument supplied: frobnicate"
    assert exc.value.body["param"] == "frobnicate"


def test_nested_options_are_checked_too(client):
    c, model = client
    for kw, param in (({"stream": True, "stream_options": {"include_usage": True, "extra": 1}}, "stream_options.extra"),
                      ({"stream_options": {"include_usage": True}}, "stream_options"),
                      ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {},
                                                                                   "extra": 1}}},
                       "response_format.json_schema.extra"),
                      ({"logit_bias": {"999999": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias")):
        with pytest.raises(openai.BadRequestError) as exc:
            c.chat.completions.create(model=model, messages=[{"role": "user", "content": "json"}], **kw)
        assert exc.value.body["param"] == param, exc.value.body
    for kw, param in (({"logprobs": 1, "echo": True, "stream": True}, "stream"), ({"max_tokens": 0}, "max_tokens"),
                      ({"prompt": [5, 10**6]}, "prompt"), ({"prompt": [[5], []]}, "prompt"), ({"logprobs": 6}, "logprobs")):
        with pytest.raises(openai.BadRequestError) as exc:
            c.completions.create(model=model, **{"prompt": "hi", **kw})
        assert exc.value.body["param"] == param, exc.value.body
    with pytest.raises(openai.BadRequestError) as exc:
        c.completions.create(model=model, prompt="hi", n=1, best_of=3)
    assert exc.value.body["param"] == "best_of"
    with pytest.raises(openai.BadRequestError) as exc:
        c.responses.create(model=model, input="hi", tools=[{"type": "web_search"}])
    assert exc.value.body["param"] == "tools"
