"""How an answer's text is read back (tunesmith.serve.plan.answer), without a server: a forced call to one
function is its arguments only, and a call cut short (max_tokens) is a call with the generation's finish reason,
never the template's markup as content, whatever the tool choice (tests/test_structured_outputs.py drives the same
through a live server and the official client)."""

import json

from tunesmith.serve.plan.answer import ChoiceDeltas, message
from tunesmith.serve.plan.tools import plan_tools

TOOLS = [{"type": "function", "function": {"name": "SetLight", "parameters": {
             "type": "object", "properties": {"state": {"type": "string", "enum": ["on", "off"]}}}}},
         {"type": "function", "function": {"name": "Sum", "parameters": {
             "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}]
NAMED = {"type": "function", "function": {"name": "SetLight"}}


def test_a_forced_call_writes_its_opening_in_the_prompt_and_decodes_only_its_arguments():
    plan = plan_tools(TOOLS, NAMED, None)
    assert plan.prefix == '<tool_call>\n{"name": "SetLight", "arguments":'
    assert plan.schema.startswith('start: " " arguments "}"') and plan.schema.token_bound < 50
    msg, called = message(plan, ' {"state": "on"}}')
    assert called and msg["content"] is None
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]] == [("SetLight", '{"state": "on"}')]
    assert plan_tools(TOOLS[:1], "required", None).prefix == plan.prefix  # required with one tool: the same


def test_a_forced_call_streams_its_name_first_then_arguments_as_generated():
    reader = ChoiceDeltas(plan_tools(TOOLS, NAMED, None))
    first = reader.feed(" {")
    assert first[0]["tool_calls"][0]["function"] == {"name": "SetLight", "arguments": ""}
    pieces = first[1:] + reader.feed('"state": "o') + reader.feed('ff"}}') + reader.close()
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in pieces) == '{"state": "off"}'
    assert reader.finish_reason("stop") == "tool_calls"


def test_a_call_cut_short_is_a_call_that_keeps_the_generations_finish_reason():
    cases = [(plan_tools(TOOLS, NAMED, None), ' {"sta', "SetLight", '{"sta', ""),
             (plan_tools(TOOLS, "required", None), '{"name": "Sum", "arguments": {"a": 1.', "Sum", '{"a": 1.', ""),
             (plan_tools(TOOLS, "required", None), '{"name": "Se', "SetLight", "", ""),  # the one tool it can be
             (plan_tools(TOOLS, "auto", None), 'Sure.\n<tool_call>\n{"name": "Sum", "arguments": {"a"', "Sum", '{"a"', "Sure.")]
    for plan, text, name, arguments, content in cases:
        msg, called = message(plan, text)
        assert not called and (msg["content"] or "") == content, (text, msg)
        [call] = msg["tool_calls"]
        assert (call["function"]["name"], call["function"]["arguments"]) == (name, arguments), (text, msg)
        reader = ChoiceDeltas(plan)
        deltas = reader.feed(text) + reader.close()
        assert reader.finish_reason("length") == "length"
        assert not any("<tool_call>" in d.get("content", "") for d in deltas)


def test_text_that_is_no_call_stays_content_and_a_whole_call_is_one():
    auto = plan_tools(TOOLS, "auto", None)
    assert message(auto, "<tool_call>\nnot a call") == ({"role": "assistant", "content": "<tool_call>\nnot a call</tool_call>"},
                                                         False)
    msg, called = message(auto, '<tool_call>\n{"name": "Sum", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
    assert called and json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"a": 1, "b": 2}
