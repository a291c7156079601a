"""Tool calling in ``/v1/chat/completions``: ``tools``, ``tool_choice`` and ``parallel_tool_calls``.

The prompt lists the tools as the model was trained on them (:mod:`tunesmith.data.formats.tool_format`: the
template's own hermes syntax, or the JSON-in-tags form in the system message). ``auto`` lets the model
choose and reads any ``<tool_call>`` it writes; ``none`` leaves the tools out. A forced call to one function (a
named function, or ``required`` with one tool) puts the call's opening (``<tool_call>``, the caller's function name,
``"arguments":``) in the prompt as the start of the assistant's turn, so that only the arguments are generated,
under the function's JSON schema (:mod:`tunesmith.generation.constrained`): ``max_tokens`` buys arguments, not the
template's wrapper. ``required`` with several tools starts the answer with ``<tool_call>`` and decodes a call to any
of them. Answers carry OpenAI's ``tool_calls`` with ``finish_reason: "tool_calls"`` (a call cut short: the call as far
as it was generated, with the generation's own finish reason), streamed as OpenAI streams them: a first delta with
the call's index, id, type and name (empty arguments), then its arguments (:mod:`tunesmith.serve.plan.answer`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tunesmith.data.formats.chat import function_names, hint
from tunesmith.data.formats.tool_format import CALL_CLOSE, CALL_OPEN, render
from tunesmith.serve.errors import APIError
from tunesmith.serve.plan.messages import check_text

# the separators json.dumps writes (and the hermes form is trained with), no free whitespace
TOOL_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass
class ToolPlan:
    """How one request treats tools: which go into the prompt, whether calls are read from the answer,
    and the JSON schema a forced call decodes under."""

    tools: list[dict] | None = None
    parse: bool = False
    schema: dict | str | None = None  # set when the answer must be a call: what it decodes under
    parallel: bool = True
    function: str | None = None  # a forced call's function: the caller's, written in the prompt; only arguments follow

    @property
    def prefix(self) -> str:
        """Text that starts the answer, in the prompt: a forced call's opening (the tag, and for one function its
        name up to ``"arguments":``, as the call's JSON is written)."""
        if self.function is not None:
            return f'{CALL_OPEN}\n{{"name": {json.dumps(self.function, ensure_ascii=False)}, "arguments":'
        return f"{CALL_OPEN}\n" if self.schema else ""


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value" if param == "tool_choice" else None)


def _functions(tools) -> dict[str, dict]:
    """name → function definition of a request's ``tools``; a malformed list, or parameters past what one schema
    may cost here (:func:`tunesmith.generation.schemas.check_schema_cost`), is a 400 on ``tools``."""
    from tunesmith.generation.schemas import SchemaRefused, check_schema_cost

    check_text(tools, "tools")
    errors: list[str] = []
    names = function_names({"tools": tools}, errors)
    if errors or not names:
        raise _bad(f"Invalid 'tools': {hint('invalid_tools')}.", "tools")
    for i, t in enumerate(tools):
        try:
            check_schema_cost(t["function"].get("parameters") or {})
        except SchemaRefused as exc:
            raise _bad(f"Invalid schema for tools[{i}].function.parameters ('{t['function']['name']}'): {exc}.",
                       "tools") from None
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
    if choice == "required" and len(functions) == 1:
        return forced_call(tools, next(iter(functions.values())), parallel)
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
    return forced_call(tools, functions[name], parallel)


def forced_call(tools: list[dict], function: dict, parallel: bool) -> ToolPlan:
    """The plan of a call to ``function`` that the caller forces: the prompt writes the call up to its arguments
    (:attr:`ToolPlan.prefix`), and the answer is a space, the arguments object under the function's bounded schema
    and the call's closing brace (the form the call is written in: ``{"name": "f", "arguments": {...}}``). The
    grammar knows its longest answer, the budget of a call without ``max_tokens``."""
    from tunesmith.generation.constrained import Grammar, reply_token_bound

    arguments = arguments_schema(function) | {"x-guidance": TOOL_JSON}
    bound = reply_token_bound(arguments)
    grammar = Grammar("\n".join(['start: " " arguments "}"', f"arguments: %json {json.dumps(arguments)}"]),
                      None if bound is None else bound + 2)
    return ToolPlan(tools, True, grammar, parallel, function["name"])


def arguments_schema(function: dict) -> dict:
    """A function's ``parameters`` as its arguments decode under: checked as a response format's schema is (a keyword
    that would constrain and is not enforced, a reference outside it, a ``false`` no arguments can satisfy: a 400 on
    ``tools`` naming it and its path), references made local, an object, bounded (string lengths and number digits,
    no extra keys) so that a call always ends."""
    from tunesmith.generation.constrained import bound_json_schema
    from tunesmith.generation.schemas import SchemaRefused, served_schema

    try:
        params = served_schema(function.get("parameters") or {"type": "object", "properties": {}}, strict=False)[0]
    except SchemaRefused as exc:
        raise _bad(f"Invalid schema for the parameters of function '{function['name']}': {exc}.", "tools") from None
    if "type" not in params and not {"$ref", "anyOf", "oneOf", "allOf"} & set(params):
        params["type"] = "object"  # arguments are an object
    return bound_json_schema(params)


def call_schema(functions: list[dict]) -> dict:
    """The JSON schema of one call ``{"name": ..., "arguments": {...}}`` to any of ``functions``, each
    function's arguments as :func:`arguments_schema` bounds them so that a call always ends. A function's own
    ``$defs`` (pydantic's nested models) move to the call's root under ``<function>.<name>``, and every ``$ref``
    of its parameters is rewritten to where they now lie (``#`` becomes the arguments' own node)."""
    defs: dict[str, dict] = {}

    def one(f: dict, where: str) -> dict:
        arguments = _hoisted(arguments_schema(f), f["name"], where, defs)
        return {"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": arguments},
                "required": ["name", "arguments"], "additionalProperties": False}

    if len(functions) == 1:
        doc = one(functions[0], "#/properties/arguments")
    else:
        doc = {"anyOf": [one(f, f"#/anyOf/{i}/properties/arguments") for i, f in enumerate(functions)]}
    return doc | ({"$defs": defs} if defs else {}) | {"x-guidance": TOOL_JSON}


def _hoisted(params: dict, function: str, where: str, defs: dict[str, dict]) -> dict:
    """``params`` (references local) without its ``$defs``/``definitions`` (added to ``defs`` under
    ``<function>.<name>``), every ``$ref`` in it and in them pointing where the call schema holds its target."""
    from tunesmith.generation.schemas import ref_keys, ref_to

    own = {(key, name): sub for key in ("$defs", "definitions")
           for name, sub in (params.get(key) or {}).items() if isinstance(params.get(key), dict)}
    renamed = {k: f"{function}.{k[1]}" for k in own}
    base = ref_keys(where)

    def moved(ref: str) -> str:
        keys = ref_keys(ref)
        if keys is None:
            return ref
        if tuple(keys[:2]) in renamed:
            return ref_to(["$defs", renamed[tuple(keys[:2])], *keys[2:]])
        return ref_to(base + keys)

    def rewrite(node):
        if isinstance(node, dict):
            return {k: (moved(v) if k == "$ref" and isinstance(v, str) else rewrite(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    for key, sub in own.items():
        defs[renamed[key]] = rewrite(sub)
    return rewrite({k: v for k, v in params.items() if k not in ("$defs", "definitions")})


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
