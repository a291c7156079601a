"""Tool calling in ``/v1/chat/completions``: ``tools``, ``tool_choice`` and ``parallel_tool_calls``.

The prompt lists the tools as the model was trained on them (:mod:`tunesmith.data.formats.tool_format`: the
template's own hermes syntax, or the JSON-in-tags form in the system message). ``auto`` lets the model
choose and reads any ``<tool_call>`` it writes; ``none`` leaves the tools out; ``required`` and a named
function start the answer with ``<tool_call>`` and decode the call under the function's JSON schema
(:mod:`tunesmith.generation.constrained`), so its arguments always parse. Answers carry OpenAI's
``tool_calls`` with ``finish_reason: "tool_calls"``, streamed as OpenAI streams them: a first delta with
the call's index, id, type and name (empty arguments), then its arguments.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from tunesmith.data.formats.chat import MESSAGE_KEYS, check_messages, function_names, hint
from tunesmith.data.formats.tool_format import CALL_CLOSE, CALL_OPEN, CallStream, render
from tunesmith.serve.engines.errors import APIError

# the separators json.dumps writes (and the hermes form is trained with), no free whitespace
TOOL_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass
class ToolPlan:
    """How one request treats tools: which go into the prompt, whether calls are read from the answer,
    and the JSON schema a forced call decodes under."""

    tools: list[dict] | None = None
    parse: bool = False
    schema: dict | None = None  # set when the answer must be a call
    parallel: bool = True

    @property
    def prefix(self) -> str:
        """Text that starts the answer (the opening tag of a forced call)."""
        return f"{CALL_OPEN}\n" if self.schema else ""


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value" if param == "tool_choice" else None)


def _functions(tools) -> dict[str, dict]:
    """name → function definition of a request's ``tools``; a malformed list is a 400 on ``tools``."""
    errors: list[str] = []
    names = function_names({"tools": tools}, errors)
    if errors or not names:
        raise _bad(f"Invalid 'tools': {hint('invalid_tools')}.", "tools")
    return {t["function"]["name"]: t["function"] for t in tools}


def plan_tools(body) -> ToolPlan:
    """The request's tool plan; an unknown function in ``tool_choice``, a ``tool_choice`` without tools or
    malformed tools is a 400 naming the param."""
    extra = body.model_extra or {}
    for legacy in ("functions", "function_call"):
        if extra.get(legacy) is not None:
            raise _bad(f"'{legacy}' is deprecated and not served; send 'tools' and 'tool_choice' instead.", legacy)
    tools, choice = body.tools, body.tool_choice
    if not tools:
        if choice is not None and choice != "none":
            raise _bad("'tool_choice' is only allowed when 'tools' are specified.", "tool_choice")
        return ToolPlan()
    functions = _functions(tools)
    choice = choice or "auto"
    parallel = body.parallel_tool_calls is not False
    if choice == "none":
        return ToolPlan()
    if choice == "auto":
        return ToolPlan(tools, parse=True, parallel=parallel)
    if choice == "required":
        return ToolPlan(tools, True, call_schema(list(functions.values())), parallel)
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise _bad("'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
                   "{\"name\": ...}}.", "tool_choice")
    if name not in functions:
        raise _bad(f"Invalid 'tool_choice': no function named '{name}' in 'tools' (known: "
                   f"{', '.join(functions)}).", "tool_choice")
    return ToolPlan(tools, True, call_schema([functions[name]]), parallel)


def call_schema(functions: list[dict]) -> dict:
    """The JSON schema of one call ``{"name": ..., "arguments": {...}}`` to any of ``functions``, each
    function's parameters bounded (string lengths, no extra keys) so that a call always ends."""
    from tunesmith.generation.constrained import bound_json_schema

    def one(f: dict) -> dict:
        params = f.get("parameters") or {"type": "object", "properties": {}}
        return {"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": bound_json_schema(params)},
                "required": ["name", "arguments"], "additionalProperties": False}

    options = [one(f) for f in functions]
    doc = options[0] if len(options) == 1 else {"anyOf": options}
    return doc | {"x-guidance": TOOL_JSON}


def calls_or_answer(plan: ToolPlan, answer: dict) -> str:
    """A Lark grammar (llguidance's syntax, both engines decode with it) of an answer that is either JSON under
    ``answer`` or tool calls as the prompt taught them (``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``,
    one a line, a single one without ``parallel_tool_calls``), each call under the schema of a call to any tool."""
    call = call_schema([t["function"] for t in plan.tools])
    calls = 'call ("\\n" call)*' if plan.parallel else "call"
    return "\n".join([
        "start: answer | calls",
        f"answer: %json {json.dumps(answer)}",
        f"calls: {calls}",
        f"call: {json.dumps(CALL_OPEN + chr(10))} %json {json.dumps(call)} {json.dumps(chr(10) + CALL_CLOSE)}",
    ])


def request_messages(body) -> list[dict]:
    """The request's messages as dicts of the keys a chat message has (a client's echo of an answer also
    carries ``refusal``, ``audio``…); tool calls and tool results are checked by the fine-tuning rules
    (every call answered by a tool message with its id), a break is a 400 on ``messages``."""
    messages = [{k: v for k, v in m.model_dump().items() if k in MESSAGE_KEYS and v is not None} for m in body.messages]
    for m in messages:
        m.setdefault("content", None if m["role"] == "assistant" else "")
    if any(m.get("tool_calls") or m.get("function_call") or m["role"] == "tool" for m in messages):
        errors = [e for e in check_messages(messages, final_calls_open=False) if e != "missing_content"]
        if errors:
            raise _bad(f"Invalid 'messages': {errors[0]}: {hint(errors[0])}.", "messages")
    return messages


def prompt_ids(engine, messages: list[dict], plan: ToolPlan) -> list[int]:
    text = render(engine.tokenizer, messages, plan.tools, add_generation_prompt=True) + plan.prefix
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def token_budget(plan: ToolPlan, budget: int) -> int:
    """A forced call may run to its schema's bound, so that it is never cut mid-JSON."""
    if plan.schema is None:
        return budget
    from tunesmith.generation.constrained import reply_token_bound

    return max(budget, reply_token_bound(plan.schema) or 0)


class ChoiceDeltas:
    """One choice's generated text → OpenAI chat deltas: ``{"content"}`` for text, ``{"tool_calls"}`` for
    calls (the first delta of a call with index, id, type, name and empty arguments, then the arguments)."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.calls = plan, 0
        self.stream = CallStream() if plan.parse else None
        if self.stream is not None and plan.prefix:
            self.stream.feed(plan.prefix)

    def feed(self, text: str) -> list[dict]:
        if self.stream is None:
            return [{"content": text}] if text else []
        return self._deltas(self.stream.feed(text))

    def close(self) -> list[dict]:
        return self._deltas(self.stream.close()) if self.stream is not None else []

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.calls else reason

    def _deltas(self, events) -> list[dict]:
        out = []
        for kind, value in events:
            if kind == "content":
                if not (self.calls and not value.strip()):  # the newlines between calls are not content
                    out.append({"content": value})
            elif self.plan.parallel or not self.calls:  # parallel_tool_calls: false answers the first call only
                out += [{"tool_calls": [{"index": self.calls, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                         "function": {"name": value["name"], "arguments": ""}}]},
                        {"tool_calls": [{"index": self.calls, "function": {
                            "arguments": json.dumps(value["arguments"], ensure_ascii=False)}}]}]
                self.calls += 1
        return out


def message(plan: ToolPlan, text: str) -> tuple[dict, bool]:
    """A whole answer as an assistant message, and whether it called tools."""
    reader = ChoiceDeltas(plan)
    deltas = reader.feed(text) + reader.close()
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for c in d.get("tool_calls", []):
            entry = calls.setdefault(c["index"], {"id": c.get("id"), "type": "function",
                                                  "function": {"name": c["function"].get("name"), "arguments": ""}})
            entry["function"]["arguments"] += c["function"].get("arguments", "")
    msg = {"role": "assistant", "content": (content.strip() or None) if calls else content}
    if calls:
        msg["tool_calls"] = [calls[i] for i in sorted(calls)]
    return msg, bool(calls)
