"""Structured outputs against a live server on the embedded model: every construct of the JSON Schema subset
OpenAI's strict mode accepts answered as JSON that validates (jsonschema), greedy and sampled with n > 1; the
official client's ``parse()``, streamed parse and ``responses.parse``; ``json_object``; a schema outside the
subset refused with the keyword and its path. Answers that end: numbers under the digit cap, references to anchors,
embedded ids and percent-encoded pointers, ``true`` served and ``false`` refused, a lone surrogate a 400; a forced
call that generates only its arguments, and one cut short that comes back as a call with ``finish_reason: "length"``
(chat and Responses, whole and streamed). The built-in engine in ``make test``, vLLM in ``make test-vllm``."""

import json
import re
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from .conftest import EMBEDDED, embedded_server

pytestmark = pytest.mark.slow


def obj(properties: dict, **extra) -> dict:
    """A strict-mode object: every property required, no others."""
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False,
            **extra}


NODE = obj({"value": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}})
# construct -> (schema, what the user asks for: a small model writes sensible values when asked for them)
CONSTRUCTS = {
    "scalars": (obj({"name": {"type": "string"}, "age": {"type": "integer"}, "height": {"type": "number"},
                     "member": {"type": "boolean"}, "nothing": {"type": "null"}}),
                "Ana is 31 years old, 1.65 m tall and a club member. Give her name, age, height and membership."),
    "enum_const": (obj({"mood": {"enum": ["happy", "sad", "calm"]}, "kind": {"const": "person"}}),
                   "Ana just won a prize. What is her mood?"),
    "array": (obj({"tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3}}),
              "List two words that describe Ana, a friendly runner."),
    "nested": (obj({"person": obj({"name": {"type": "string"}, "address": obj({"city": {"type": "string"},
                                                                               "zip": {"type": "string"}})})}),
               "Ana lives in Paris, zip code 75001. Give her name and address."),
    "any_of": (obj({"value": {"anyOf": [{"type": "integer"}, obj({"text": {"type": "string"}})]}}),
               "What is two plus two?"),
    "nullable": (obj({"nickname": {"type": ["string", "null"]}, "score": {"anyOf": [{"type": "number"},
                                                                                    {"type": "null"}]}}),
                 "Ana has no nickname and scored 7.5 points. Give her nickname and score."),
    "defs_ref": (obj({"home": {"$ref": "#/$defs/place"}, "work": {"$ref": "#/$defs/place"}},
                     **{"$defs": {"place": obj({"city": {"type": "string"}})}}),
                 "Ana lives in Paris and works in Lyon. Give her home and work cities."),
    "recursive": ({**obj({"list": {"$ref": "#/$defs/node"}}), "$defs": {"node": NODE}},
                  'The list holds 1 then 2: {"list": {"value": 1, "next": {"value": 2, "next": null}}}'),
    "string_rules": (obj({"day": {"type": "string", "format": "date"},
                          "code": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"}}),
                     "Ana's flight ABC12 leaves on 2026-05-01. Give the day and the flight code."),
    "number_rules": (obj({"percent": {"type": "integer", "minimum": 0, "maximum": 100},
                          "step": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                          "even": {"type": "integer", "multipleOf": 2}}),
                     "Ana finished 40 percent of the course in steps of 0.5, and has 4 dogs."),
}


@pytest.fixture(scope="module", params=["builtin", pytest.param("vllm", marks=pytest.mark.vllm)])
def live(request, tmp_path_factory):
    # a long deadline: on a shared 2-core machine 30 rows in one batch can take minutes
    with embedded_server(request.param, tmp_path_factory.mktemp("structured"), max_tokens=400,
                         request_timeout_s=1800) as url:
        yield openai.OpenAI(base_url=url, api_key="none", max_retries=0)


def ask(client, schema: dict, strict: bool = True, prompt: str = "Describe Ana, in JSON.", **kw):
    """The schema in the system message too, as apps write it: a 135M model then fills it with sensible values."""
    return client.chat.completions.create(
        model=EMBEDDED, messages=[{"role": "system", "content": f"Answer in JSON with this schema: {json.dumps(schema)}"},
                                  {"role": "user", "content": prompt}],
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": strict}},
        **kw)


def test_every_construct_validates_greedy_and_sampled(live):
    """For each construct a greedy answer and two sampled ones, every request sent at once (one batch), each
    answer valid JSON under its schema."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2 * len(CONSTRUCTS)) as pool:
        asked = {(name, kind): pool.submit(ask, live, schema, prompt=prompt, **kw)
                 for name, (schema, prompt) in CONSTRUCTS.items()
                 for kind, kw in (("greedy", {"temperature": 0}),
                                  ("sampled", {"temperature": 0.7, "top_p": 0.9, "seed": 7, "n": 2}))}
    wrong = []
    for (name, kind), future in asked.items():
        choices = future.result().choices
        assert len(choices) == (2 if kind == "sampled" else 1)
        for choice in choices:
            try:
                assert choice.finish_reason == "stop", f"finish_reason {choice.finish_reason}"
                jsonschema.validate(json.loads(choice.message.content), CONSTRUCTS[name][0])
            except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
                wrong.append(f"{name} {kind}: {exc}: {choice.message.content[:300]}")
    assert not wrong, "\n".join(wrong)


class Address(BaseModel):
    city: str
    zip: str | None


class Person(BaseModel):
    name: str
    age: int
    mood: Literal["happy", "sad"]
    address: Address


def test_parse_and_streamed_parse_return_the_object(live):
    messages = [{"role": "user", "content": "Describe Alice, 31, from Paris."}]
    parsed = live.chat.completions.parse(model=EMBEDDED, messages=messages, response_format=Person, temperature=0)
    assert isinstance(parsed.choices[0].message.parsed, Person)
    with live.chat.completions.stream(model=EMBEDDED, messages=messages, response_format=Person,
                                      temperature=0) as stream:
        kinds = {event.type for event in stream}
        final = stream.get_final_completion()
    assert "content.delta" in kinds and final.choices[0].message.parsed == parsed.choices[0].message.parsed
    answer = live.responses.parse(model=EMBEDDED, input="Describe Alice, 31, from Paris.", text_format=Person,
                                  temperature=0)
    assert isinstance(answer.output_parsed, Person)


def test_json_object_and_loose_schemas(live):
    """json_object answers are checked through LangChain's json_mode and instructor's JSON mode
    (tests/test_client_libraries.py); here a loose schema, and json_object without the word in the messages."""
    loose = {"type": "object", "properties": {"word": {"type": "string", "minLength": 3, "maxLength": 8}},
             "required": ["word"], "title": "Word"}  # not strict: minLength and an open object are fine
    doc = json.loads(ask(live, loose, strict=False, temperature=0).choices[0].message.content)
    jsonschema.validate(doc, loose)
    # no word "json" in the messages (what the Vercel AI SDK sends): still a JSON object, never a 400
    question = "What is the capital of France? Reply as an object."
    reply = live.chat.completions.create(model=EMBEDDED, response_format={"type": "json_object"}, temperature=0,
                                         messages=[{"role": "user", "content": question}])
    assert reply.choices[0].finish_reason == "stop" and isinstance(json.loads(reply.choices[0].message.content), dict)


@pytest.mark.parametrize("schema,strict,keyword,path", [
    (obj({"name": {"type": "string", "minLength": 2}}), True, "minLength", "#/properties/name"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}, True, "additionalProperties", "#"),
    (obj({"a": {"type": "string"}, "b": {"type": "string"}}) | {"required": ["a"]}, True, "required", "#"),
    (obj({"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}), False, "uniqueItems",
     "#/properties/tags"),
    (obj({"n": {"not": {"type": "integer"}}}), False, "not", "#/properties/n"),
    (obj({"a": {"type": "string"}}) | {"dependencies": {"a": ["a"]}}, False, "dependencies", "#"),
    ({"anyOf": [obj({"a": {"type": "string"}})]}, True, "type", "#"),
    (obj({"d": {"type": "string", "format": "color"}}), True, "format", "#/properties/d"),
    (obj({"x": {"$ref": "#/$defs/missing"}}), True, "$ref", "#/properties/x"),
])
def test_a_schema_outside_the_subset_is_a_400_naming_keyword_and_path(live, schema, strict, keyword, path):
    with pytest.raises(openai.BadRequestError) as exc:
        ask(live, schema, strict=strict)
    body = exc.value.body
    assert body["param"] == "response_format" and f"'{keyword}' at '{path}'" in body["message"], body


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": obj({"city": {"type": "string"}})}}
FORECAST = obj({"city": {"type": "string"}, "sky": {"enum": ["sunny", "rainy", "cloudy"]}})


def test_tools_the_model_may_call_beside_a_json_format(live):
    """tool_choice 'auto' with a JSON schema format (an Agents SDK agent with tools and an output_type): each
    answer is either tool calls whose arguments validate against the tool's schema, or content that validates
    against the format; never free text."""
    forms = set()
    for prompt, temperature in (("What is the weather in Paris? Call get_weather.", 0),
                                ("The sky over Paris is sunny today. Report it as JSON.", 0),
                                ("Weather in Rome?", 0.9)):
        reply = live.chat.completions.create(
            model=EMBEDDED, messages=[{"role": "user", "content": prompt}], tools=[WEATHER], tool_choice="auto",
            response_format={"type": "json_schema", "json_schema": {"name": "forecast", "schema": FORECAST,
                                                                    "strict": True}},
            temperature=temperature, n=2, seed=3)
        for choice in reply.choices:
            message = choice.message
            if message.tool_calls:
                assert choice.finish_reason == "tool_calls" and not message.content, choice
                for call in message.tool_calls:
                    assert call.function.name == "get_weather"
                    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
                forms.add("call")
            else:
                jsonschema.validate(json.loads(message.content), FORECAST)
                forms.add("answer")
    assert forms, "no answer"


# --- answers that end: numbers, references, booleans, forced calls ------------------------------------------

NUMBER = re.compile(r"-?(\d+)(?:\.(\d+))?([eE][+-]?\d+)?")


@pytest.mark.parametrize("schema", [{"minimum": 1.1}, {"type": "number"}, obj({"value": {"type": "number"}})])
def test_a_number_ends_within_the_digit_cap(live, schema):
    """A greedy small model never ends a number by itself (10.0000000000…): under the digit cap it ends, valid."""
    reply = ask(live, schema, strict=False, prompt="What is ten divided by three? Answer with the number.",
                temperature=0, max_tokens=60).choices[0]
    assert reply.finish_reason == "stop", reply.message.content
    jsonschema.validate(json.loads(reply.message.content), schema)
    for whole, fraction, exponent in NUMBER.findall(reply.message.content):
        assert len(whole) <= 15 and len(fraction) <= 6 and not exponent, reply.message.content


ANCHORED = {"$ref": "#legs", "$defs": {"count": {"$anchor": "legs", "type": "integer", "minimum": 0, "maximum": 99}}}
EMBEDDED_ID = {"$id": "https://example.com/trip.json", "type": "object", "properties": {"city": {"$ref": "city.json"}},
               "required": ["city"], "$defs": {"c": {"$id": "city.json", "type": "string", "enum": ["Paris", "Rome"]}}}
PERCENT = obj({"legs": {"$ref": "#/$defs/per%25cent"}, "name": {"$ref": "#/$defs/~1named"}},
              **{"$defs": {"per%cent": {"type": "integer"}, "/named": {"type": "string", "maxLength": 12}}})


@pytest.mark.parametrize("schema", [ANCHORED, EMBEDDED_ID, PERCENT], ids=["anchor", "embedded_id", "percent"])
def test_references_resolve_as_the_specification_says(live, schema):
    """$ref to an $anchor, to an embedded $id (relative to the root's base URI) and down a percent-encoded pointer:
    served, and the answer validates under the caller's schema (jsonschema resolves them the same way)."""
    reply = ask(live, schema, strict=False, prompt="A spider in Paris has how many legs?", temperature=0).choices[0]
    assert reply.finish_reason == "stop", reply.message.content
    jsonschema.Draft202012Validator(schema).validate(json.loads(reply.message.content))


def test_true_is_any_value_and_false_or_a_ref_outside_is_refused(live):
    reply = ask(live, True, strict=False, prompt="What is two plus two?", temperature=0).choices[0]
    assert reply.finish_reason == "stop"
    json.loads(reply.message.content)  # any JSON value
    for schema, says in ((False, "'schema' at '#' is false"),
                         ({"$ref": "#/$defs/no", "$defs": {"no": False}}, "'false' at '#/$defs/no'"),
                         (obj({"a": {"$ref": "https://example.com/a.json"}}), "'$ref' at '#/properties/a'")):
        with pytest.raises(openai.BadRequestError) as exc:
            ask(live, schema, strict=False)
        body = exc.value.body
        assert body["param"] == "response_format" and says in body["message"], body


def test_a_lone_surrogate_in_a_schema_property_name_is_a_400_naming_the_field(live):
    """JSON lets "\\ud800" through, no text encoding holds it: a 400 naming the field, in a response format's
    schema and in a tool's parameters (JSON written by hand: json.dumps would escape the backslash)."""
    import httpx

    schema = '{"type": "object", "properties": {"\\ud800x": {"type": "string"}}}'
    fields = {"response_format": '{"type": "json_schema", "json_schema": {"name": "a", "schema": ' + schema + "}}",
              "tools": '[{"type": "function", "function": {"name": "f", "parameters": ' + schema + "}}]"}
    for param, value in fields.items():
        body = '{"model": "' + EMBEDDED + '", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "'
        r = httpx.post(f"{live.base_url}chat/completions", content=body + param + '": ' + value + "}",
                       headers={"Content-Type": "application/json"}, timeout=120)
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"].startswith(param), r.text
        assert "lone UTF-16 surrogate" in error["message"] and "\\ud800" in error["message"], r.text


PERSON_TOOL = {"type": "function", "function": {"name": "Person", "parameters": {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]}}}
PET_TOOL = {"type": "function", "function": {"name": "Pet", "parameters": obj({"kind": {"type": "string"}})}}
PERSON_QUESTION = [{"role": "user", "content": 'Alice is 31 years old. Answer in JSON, like {"name": "Bob", "age": 40}.'}]


def _streamed_call(chunks) -> tuple[dict, str | None, str]:
    """The call a client assembles from chat deltas, the finish reason and the content streamed."""
    call, finish, content = {"name": None, "arguments": "", "calls": set()}, None, ""
    for chunk in chunks:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                call["calls"].add(d.index)
                call["name"] = (d.function.name if d.function else None) or call["name"]
                call["arguments"] += (d.function.arguments or "") if d.function else ""
    return call, finish, content


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "Person"}}, "required"])
def test_a_forced_call_to_one_function_generates_only_its_arguments(live, choice):
    """The name is the caller's: sixteen tokens hold the arguments, which the wrapper and name used to eat."""
    reply = live.chat.completions.create(model=EMBEDDED, messages=PERSON_QUESTION, tools=[PERSON_TOOL],
                                         tool_choice=choice, max_tokens=16, temperature=0)
    answer = reply.choices[0]
    assert answer.finish_reason == "tool_calls" and answer.message.content is None, answer
    [call] = answer.message.tool_calls
    assert call.function.name == "Person"
    jsonschema.validate(json.loads(call.function.arguments), PERSON_TOOL["function"]["parameters"])
    assert reply.usage.completion_tokens < 16


def test_a_call_cut_short_is_a_tool_call_with_finish_reason_length(live):
    """Chat and Responses, whole and streamed: a call cut by max_tokens is a call (arguments as far as generated)
    that says "length", never the template's markup in content."""
    forced = {"type": "function", "function": {"name": "Person"}}
    kw = {"model": EMBEDDED, "messages": PERSON_QUESTION, "tools": [PERSON_TOOL], "tool_choice": forced,
          "max_tokens": 4, "temperature": 0}
    answer = live.chat.completions.create(**kw).choices[0]
    assert answer.finish_reason == "length" and answer.message.content is None, answer
    [call] = answer.message.tool_calls
    assert call.function.name == "Person" and call.function.arguments.startswith("{"), call
    streamed, finish, content = _streamed_call(live.chat.completions.create(stream=True, **kw))
    assert finish == "length" and content == "" and streamed["calls"] == {0}
    assert (streamed["name"], streamed["arguments"]) == ("Person", call.function.arguments)
    several = live.chat.completions.create(**kw | {"tools": [PERSON_TOOL, PET_TOOL], "tool_choice": "required",
                                                   "max_tokens": 9}).choices[0]
    assert several.finish_reason == "length" and several.message.content is None, several
    assert several.message.tool_calls[0].function.name in ("Person", "Pet")
    response = live.responses.create(model=EMBEDDED, input=PERSON_QUESTION[0]["content"], temperature=0,
                                     tools=[{"type": "function", **PERSON_TOOL["function"]}],
                                     tool_choice={"type": "function", "name": "Person"}, max_output_tokens=4)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    [item] = response.output
    assert (item.type, item.name, item.status, item.arguments) == ("function_call", "Person", "incomplete",
                                                                    call.function.arguments)
    with live.responses.stream(model=EMBEDDED, input=PERSON_QUESTION[0]["content"], temperature=0,
                               tools=[{"type": "function", **PERSON_TOOL["function"]}],
                               tool_choice={"type": "function", "name": "Person"}, max_output_tokens=4) as stream:
        events = list(stream)  # the client's get_final_response() wants response.completed: read the last event
    kinds, final = [e.type for e in events], events[-1].response
    assert kinds[-1] == "response.incomplete" and "response.output_text.delta" not in kinds
    assert [(i.type, i.status, i.arguments) for i in final.output] == [("function_call", "incomplete",
                                                                        call.function.arguments)]
