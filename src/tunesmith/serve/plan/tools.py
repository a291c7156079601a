"""Tool calling in ``/v1/chat/completions``: ``tools``, ``tool_choice`` and ``parallel_tool_calls``.

The prompt lists the tools as the model was trained on them (:mod:`tunesmith.data.formats.tool_format`: the
template's own hermes syntax, or the JSON-in-tags form in the system message). ``auto`` lets the model
choose and reads any ``<tool_call>`` it writes; ``none`` leaves the tools out; ``required`` and a named
function start the answer with ``<tool_call>`` and decode the call under the function's JSON schema
(:mod:`tunesmith.generation.constrained`), so its arguments always parse. Answers carry OpenAI's
``tool_calls`` with ``finish_reason: "tool_calls"``, streamed as OpenAI streams them: a first delta with
the call's index, id, type and name (empty arguments), then its arguments (:mod:`tunesmith.serve.plan.answer`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tunesmith.data.formats.chat import function_names, hint
from tunesmith.data.formats.tool_format import CALL_CLOSE, CALL_OPEN, render
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


def plan_tools(tools: list[dict] | None, choice, parallel_tool_calls: bool | None, extra: dict | None = None) -> ToolPlan:
    """The request's tool plan from its ``tools``, ``tool_choice`` and ``parallel_tool_calls`` (``extra``: the body's
    other fields, where the deprecated ``functions`` and ``function_call`` would be); an unknown function in
    ``tool_choice``, a ``tool_choice`` without tools or malformed tools is a 400 naming the param."""
    for legacy in ("functions", "function_call"):
        if (extra or {}).get(legacy) is not None:
            raise _bad(f"'{legacy}' is deprecated and not served; send 'tools' and 'tool_choice' instead.", legacy)
    if not tools:
        if choice is not None and choice != "none":
            raise _bad("'tool_choice' is only allowed when 'tools' are specified.", "tool_choice")
        return ToolPlan()
    functions = _functions(tools)
    choice = choice or "auto"
    parallel = parallel_tool_calls is not False
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


def prompt_ids(engine, messages: list[dict], plan: ToolPlan) -> list[int]:
    text = render(engine.tokenizer, messages, plan.tools, add_generation_prompt=True) + plan.prefix
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]
