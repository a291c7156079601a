"""The rest of the surface clients use, through the official `openai` client on the tiny model: logprobs and
streaming on /v1/completions (echo, include_usage), logprobs in streamed chat chunks, logit_bias and penalties,
Responses with function tools (the model's call, the caller's function_call_output continued with
previous_response_id, streamed as the client's event types), text.format, stored responses."""

import json

import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from tunesmith.serve.app import ServeSettings, create_app
from tunesmith.serve.engines.builtin import Engine

from .conftest import running_server

TOOL = {"type": "function", "name": "track_card", "description": "Where a new card is",
        "parameters": {"type": "object", "properties": {}, "required": [], "additionalProperties": False}}


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    engine = Engine(str(tiny_model_dir), {}, wait_ms=5)
    settings = ServeSettings(model=str(tiny_model_dir), api_keys=frozenset({"k1", "k2"}),
                             data_dir=tmp_path_factory.mktemp("surface"))
    with running_server(create_app(settings, engine)) as url:
        yield {"url": url, "model": str(tiny_model_dir), "engine": engine}


def client(live, key="k1"):
    return openai.OpenAI(base_url=live["url"], api_key=key, max_retries=0)


def test_completions_logprobs_stream_echo_and_usage(live):
    c, model = client(live), live["model"]
    whole = c.completions.create(model=model, prompt="my card", max_tokens=6, temperature=0, logprobs=3)
    lp = whole.choices[0].logprobs
    assert len(lp.tokens) == whole.usage.completion_tokens and "".join(lp.tokens) == whole.choices[0].text
    assert all(len(t) == 3 and max(t.values()) >= v - 1e-5 for t, v in zip(lp.top_logprobs, lp.token_logprobs,
                                                                              strict=True))
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    chunks = list(c.completions.create(model=model, prompt="my card", max_tokens=6, temperature=0, logprobs=3,
                                       stream=True, stream_options={"include_usage": True}))
    assert all(isinstance(ch, Completion) for ch in chunks)
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    tokens = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    assert text == whole.choices[0].text and tokens == lp.tokens
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    echoed = c.completions.create(model=model, prompt=["my card", "pin"], max_tokens=3, temperature=0, echo=True, n=2)
    assert [ch.text[:7] for ch in echoed.choices[:2]] == ["my card"] * 2 and echoed.choices[2].text.startswith("pin")
    assert echoed.choices[0].text == "my card" + whole.choices[0].text[: len(echoed.choices[0].text) - 7]


def test_streamed_chat_chunks_carry_the_logprobs_of_their_tokens(live):
    c = client(live)
    kw = {"model": live["model"], "messages": [{"role": "user", "content": "my card has not arrived"}],
          "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    whole = c.chat.completions.create(**kw)
    assert isinstance(whole, ChatCompletion) and len(whole.choices[0].logprobs.content) == whole.usage.completion_tokens
    streamed = [t for ch in c.chat.completions.create(stream=True, **kw)
                for choice in ch.choices if choice.logprobs for t in choice.logprobs.content]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in whole.choices[0].logprobs.content]


def test_logit_bias_and_penalties_change_the_answer(live):
    c, model = client(live), live["model"]
    kw = {"model": model, "prompt": "my card", "max_tokens": 8, "temperature": 0, "logprobs": 0}
    plain = c.completions.create(**kw).choices[0]
    tok = live["engine"].tokenizer
    first = tok(plain.logprobs.tokens[0], add_special_tokens=False)["input_ids"][0]
    banned = c.completions.create(logit_bias={str(first): -100}, **kw).choices[0]
    assert banned.logprobs.tokens[0] != plain.logprobs.tokens[0]
    forced = c.completions.create(logit_bias={str(first): 100}, **kw).choices[0]
    assert set(forced.logprobs.tokens) == {plain.logprobs.tokens[0]}  # the biased token every time
    penalised = c.completions.create(frequency_penalty=2, presence_penalty=2, **kw).choices[0]
    assert len(set(penalised.logprobs.tokens)) >= len(set(plain.logprobs.tokens))
    assert penalised.text != forced.text


def test_responses_function_call_then_its_output_continued(live):
    c, model = client(live), live["model"]
    first = c.responses.create(model=model, input="where is my new card?", tools=[TOOL], tool_choice="required")
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "track_card" and json.loads(call.arguments) == {} and call.call_id
    assert c.responses.retrieve(first.id).output[-1].call_id == call.call_id
    follow = c.responses.create(model=model, previous_response_id=first.id, max_output_tokens=5, tools=[TOOL],
                                input=[{"type": "function_call_output", "call_id": call.call_id, "output": "in the post"}])
    assert follow.output[0].type == "message" and follow.previous_response_id == first.id
    assert follow.usage.input_tokens > first.usage.input_tokens  # the earlier turns are in the prompt
    with pytest.raises(openai.NotFoundError):  # another key's response is not there for it
        client(live, "k2").responses.create(model=model, previous_response_id=first.id, input="x")
    c.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(first.id)
    unstored = c.responses.create(model=model, input="hi", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(unstored.id)


def test_responses_stream_a_function_call_as_the_client_types_it(live):
    c = client(live)
    kinds, args = [], ""
    with c.responses.stream(model=live["model"], input="where is my card?", tools=[TOOL],
                            tool_choice={"type": "function", "name": "track_card"}) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.function_call_arguments.delta":
                args += event.delta
        final = stream.get_final_response()
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    assert final.output[0].type == "function_call" and final.output[0].arguments == args


def test_responses_text_format_and_logprobs(live):
    c = client(live)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["s", "m", "l"]}},
              "required": ["ok", "size"], "additionalProperties": False}
    r = c.responses.create(model=live["model"], input="json please", include=["message.output_text.logprobs"],
                           top_logprobs=2, text={"format": {"type": "json_schema", "name": "x", "schema": schema,
                                                            "strict": True}})
    doc = json.loads(r.output_text)
    assert set(doc) == {"ok", "size"} and doc["size"] in ("s", "m", "l")
    part = r.output[0].content[0]
    assert "".join(t.token for t in part.logprobs) == r.output_text and len(part.logprobs[0].top_logprobs) == 2
    with pytest.raises(openai.BadRequestError) as exc:
        c.responses.create(model=live["model"], input="x", text={"format": {
            "type": "json_schema", "name": "x", "strict": True, "schema": schema | {"minProperties": 1}}})
    assert exc.value.body["param"] == "text.format" and "'minProperties' at '#'" in exc.value.body["message"]
