"""One tenant cannot hurt another: what one key sends is bounded before it reaches what every key shares.

Against a live server on the embedded model with two keys (the built-in engine in ``make test``, vLLM in ``make
test-vllm``), each hostile request of one key gets a 4xx or a conforming answer within seconds while the other
key's stream, started first, finishes whole: a schema whose ``$defs`` form a DAG, an out-of-range ``seed``,
``minItems: 1000000000``, an object nested 300 levels, a ``$ref`` cycle no answer can end, a 5 MB schema, a body
past the server's cap. Real-world schemas are served as the specification says (annotations and unknown keywords
ignored and listed in a header; boolean subschemas), a pydantic nested-model tool is called with arguments that
validate, and a forced call keeps to ``max_tokens``.
"""

from __future__ import annotations

import json
import threading
import time

import httpx2 as httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from .conftest import EMBEDDED, embedded_server

pytestmark = pytest.mark.slow
KEYS = ("tenant-a", "tenant-b")
WITHIN_S = 20  # "within seconds" on a shared 2-core machine, the other tenant's stream decoding beside it


@pytest.fixture(scope="module", params=["builtin", pytest.param("vllm", marks=pytest.mark.vllm)])
def live(request, tmp_path_factory):
    with embedded_server(request.param, tmp_path_factory.mktemp("tenants"), api_keys=frozenset(KEYS), max_tokens=96,
                         request_timeout_s=600) as url:
        yield url


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=300)


class Neighbour(threading.Thread):
    """The other tenant: one streamed answer, read to its end."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.text, self.finish, self.error, self.chunks = url, "", None, None, threading.Event()

    def run(self):
        try:
            stream = client(self.url, KEYS[1]).chat.completions.create(
                model=EMBEDDED, messages=[{"role": "user", "content": "Count from one to twenty in words."}],
                max_tokens=40, temperature=0, stream=True)
            for chunk in stream:
                self.chunks.set()
                for c in chunk.choices:
                    self.text += c.delta.content or ""
                    self.finish = c.finish_reason or self.finish
        except Exception as exc:  # noqa: BLE001 - the test says what the neighbour met
            self.error = exc


def beside_a_neighbour(url: str, attack):
    """Run ``attack()`` (tenant a) while tenant b's stream is decoding; returns what the attack returned or raised
    and its seconds, once b's stream has ended whole."""
    other = Neighbour(url)
    other.start()
    assert other.chunks.wait(120), "the neighbour's stream did not start"
    t0 = time.monotonic()
    try:
        outcome = attack()
    except openai.APIStatusError as exc:
        outcome = exc
    seconds = time.monotonic() - t0
    other.join(300)
    assert not other.is_alive() and other.error is None, f"the other tenant's stream was harmed: {other.error!r}"
    assert other.finish in ("stop", "length") and len(other.text) > 10, (other.finish, other.text)
    return outcome, seconds


def schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


def dag(levels: int = 24) -> dict:
    """Each level refers to the next twice: 2^24 paths through a 2.5 KB schema."""
    defs = {f"L{i}": {"type": "object", "properties": {"a": {"$ref": f"#/$defs/L{i + 1}"},
                                                       "b": {"$ref": f"#/$defs/L{i + 1}"}}} for i in range(levels)}
    defs[f"L{levels}"] = {"type": "string", "maxLength": 4}
    return {"$defs": defs, "$ref": "#/$defs/L0"}


def nested(levels: int) -> dict:
    node: dict = {"type": "string"}
    for _ in range(levels):
        node = {"type": "object", "properties": {"x": node}, "required": ["x"]}
    return node


CYCLE = {"$defs": {"A": {"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}, "required": ["a"]}},
         "$ref": "#/$defs/A"}
HUGE = {"type": "object", "properties": {f"field_{i:06d}": {"type": "string", "description": "x" * 40}
                                         for i in range(80_000)}}  # about 5 MB as JSON

# name -> (request fields, the keyword or field a 400 names)
REFUSED = {
    "seed_past_int64": ({"seed": 2**64 - 1, "n": 2, "temperature": 0.7}, "seed"),
    "min_items_1e9": ({"response_format": schema_format({"type": "array", "items": {"type": "integer"},
                                                         "minItems": 1_000_000_000}), "max_tokens": 32}, "minItems"),
    "object_300_deep": ({"response_format": schema_format(nested(300))}, "nests deeper"),
    "ref_cycle": ({"response_format": schema_format(CYCLE)}, "recurses without end"),
    "schema_5mb": ({"response_format": schema_format(HUGE)}, "'schema' at '#'"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_hostile_request_is_a_400_in_seconds_and_the_other_tenant_is_unharmed(live, name):
    fields, named = REFUSED[name]

    def attack():
        return client(live, KEYS[0]).chat.completions.create(
            model=EMBEDDED, messages=[{"role": "user", "content": "Answer in JSON."}], **fields)

    outcome, seconds = beside_a_neighbour(live, attack)
    assert isinstance(outcome, openai.BadRequestError), outcome
    assert named in json.dumps(outcome.body), outcome.body
    assert seconds < WITHIN_S, f"{name}: refused after {seconds:.1f} s"


def test_a_dag_schema_is_answered_in_seconds_and_conforms(live):
    schema = dag()

    def attack():
        return client(live, KEYS[0]).chat.completions.create(
            model=EMBEDDED, messages=[{"role": "user", "content": "Reply with the empty JSON object {} and nothing else."}],
            response_format=schema_format(schema), temperature=0, max_tokens=64)

    outcome, seconds = beside_a_neighbour(live, attack)
    assert seconds < WITHIN_S + 30, f"the DAG schema took {seconds:.1f} s"
    assert not isinstance(outcome, Exception), outcome
    choice = outcome.choices[0]
    if choice.finish_reason == "stop":
        jsonschema.validate(json.loads(choice.message.content), schema)
    else:
        assert choice.finish_reason == "length" and outcome.usage.completion_tokens == 64


def test_a_body_past_the_cap_is_a_413_in_openais_shape(live):
    body = {"model": EMBEDDED, "messages": [{"role": "user", "content": "x" * (17 * 1024 * 1024)}]}
    r = httpx.post(f"{live}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text

    def chunks():
        yield b'{"model": "' + EMBEDDED.encode() + b'", "messages": [{"role": "user", "content": "'
        for _ in range(17):
            yield b"y" * (1024 * 1024)
        yield b'"}]}'

    r = httpx.post(f"{live}/chat/completions", content=chunks(), timeout=60,  # no Content-Length: counted as it comes
                   headers={"Authorization": f"Bearer {KEYS[0]}", "Content-Type": "application/json"})
    assert r.status_code == 413 and "limit of 16 MB" in r.json()["error"]["message"], r.text


def test_real_world_schemas_are_served_as_the_specification_says(live):
    """Annotations and unknown keywords (draft-04 ``id``, ``x-*``, ``markdownDescription``, a typo) are ignored and
    listed in a header; a boolean subschema is a schema; ``json_object`` needs no word "json" in the messages."""
    schema = {"id": "https://example.com/person.json", "type": "object", "decription": "a typo",
              "properties": {"name": {"type": "string", "maxLength": 20, "markdownDescription": "*the* name",
                                      "x-order": 1},
                             "anything": True},
              "required": ["name"], "additionalProperties": False}
    raw = client(live, KEYS[0]).chat.completions.with_raw_response.create(
        model=EMBEDDED, messages=[{"role": "user", "content": "Ana is a runner. Give her name."}],
        response_format=schema_format(schema), temperature=0)
    ignored = raw.headers["x-tunesmith-ignored-keywords"]
    for keyword in ("id at #", "decription at #", "markdownDescription at #/properties/name", "x-order"):
        assert keyword in ignored, ignored
    reply = raw.parse()
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    plain = client(live, KEYS[0]).chat.completions.create(
        model=EMBEDDED, messages=[{"role": "user", "content": "Name a fruit and its colour."}],
        response_format={"type": "json_object"}, temperature=0, max_tokens=40)
    if plain.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(plain.choices[0].message.content), dict)


def test_a_keyword_that_would_constrain_and_is_not_enforced_is_still_a_400(live):
    with pytest.raises(openai.BadRequestError) as exc:
        client(live, KEYS[0]).chat.completions.create(
            model=EMBEDDED, messages=[{"role": "user", "content": "Answer."}],
            response_format=schema_format({"type": "object", "properties": {"a": {"type": "string"}},
                                           "dependentRequired": {"a": ["b"]}}))
    assert "'dependentRequired' at '#'" in exc.value.body["message"]


class Address(BaseModel):
    city: str
    country: str


class Person(BaseModel):
    name: str
    home: Address


def test_a_pydantic_nested_model_tool_is_called_with_arguments_that_validate(live):
    tool = openai.pydantic_function_tool(Person, name="save_person")
    assert "$defs" in json.dumps(tool["function"]["parameters"])  # pydantic's shape for a nested model
    reply = client(live, KEYS[0]).chat.completions.create(
        model=EMBEDDED, messages=[{"role": "user", "content": "Save Ana, who lives in Paris, France."}],
        tools=[tool], tool_choice={"type": "function", "function": {"name": "save_person"}}, temperature=0,
        max_tokens=96)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    Person.model_validate_json(choice.message.tool_calls[0].function.arguments)


def test_a_forced_call_keeps_to_max_tokens(live):
    tool = {"type": "function", "function": {"name": "note", "parameters": {
        "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}
    reply = client(live, KEYS[0]).chat.completions.create(
        model=EMBEDDED, messages=[{"role": "user", "content": "Write a long note about Paris."}], tools=[tool],
        tool_choice="required", max_tokens=5, temperature=0)
    assert reply.usage.completion_tokens <= 5 and reply.choices[0].finish_reason == "length", reply


def test_a_lone_surrogate_is_a_400_naming_where_it_is(live):
    """JSON lets "\\ud800" through; no tokenizer can encode it: a 400 naming the field, not Python's codec error."""
    headers = {"Authorization": f"Bearer {KEYS[0]}", "Content-Type": "application/json"}

    def raw(fields: str) -> str:  # JSON written by hand: json.dumps would escape the surrogate's backslash
        return '{"model": "' + EMBEDDED + '", "max_tokens": 4, ' + fields + "}"

    chat = raw('"messages": [{"role": "user", "content": "hi \\ud800 there"}]')
    r = httpx.post(f"{live}/chat/completions", content=chat, headers=headers, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content", r.text
    assert "lone UTF-16 surrogate" in r.json()["error"]["message"]
    r = httpx.post(f"{live}/completions", content=raw('"prompt": ["ok", "x\\udc00"]'), headers=headers, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt[1]", r.text
    pair = raw('"messages": [{"role": "user", "content": "a smile \\ud83d\\ude00"}]')
    assert httpx.post(f"{live}/chat/completions", content=pair, headers=headers, timeout=120).status_code == 200
