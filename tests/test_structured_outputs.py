"""Structured outputs against a live server on the embedded model: every construct of the JSON Schema subset
OpenAI's strict mode accepts answered as JSON that validates (jsonschema), greedy and sampled with n > 1; the
official client's ``parse()``, streamed parse and ``responses.parse``; ``json_object``; a schema outside the
subset refused with the keyword and its path. The built-in engine in ``make test``, vLLM in ``make test-vllm``."""

import json
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
