"""One request plan from any of the three generation requests (chat completions, completions, Responses).

A :class:`RequestPlan` says everything the engines and the answer need: the prompts as token ids, each choice's
sampling settings (token budget, penalties, bias, seed), the one output constraint (a forced tool call's JSON,
``response_format`` or Responses' ``text.format``: a JSON schema the answer decodes under), how the answer is read
(text, JSON content or tool calls), logprobs, ``n`` and the stream options. The routes compile its constraint off
the event loop (:func:`with_constraint`), both engines take it (:meth:`tunesmith.serve.engines.builtin.InferenceEngine.run`),
and the routes turn its generations into OpenAI's shapes.
Every field the request sent has been checked against :mod:`tunesmith.serve.plan.fields` first.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from tunesmith.generation import GenParams
from tunesmith.serve.engines.errors import APIError
from tunesmith.serve.plan.tools import ToolPlan

CHAT_DEFAULT_MAX = 256
COMPLETION_DEFAULT_MAX = 16
MAX_BIAS = 100


@dataclass
class OutputFormat:
    """What the answer is: free text, or JSON under ``schema`` (the caller's; ``constraint`` is the bounded copy
    decoding runs under). ``param``: the request field it came from, named by its errors."""

    json: bool = False
    schema: dict | None = None
    constraint: dict | None = None
    param: str = "response_format"


@dataclass
class RequestPlan:
    model: str
    prompts: list[list[int]]
    params: list[GenParams]  # one per choice (n), the same for every prompt
    tools: ToolPlan = field(default_factory=ToolPlan)
    output: OutputFormat = field(default_factory=OutputFormat)
    spec: dict | str | None = None  # what every choice decodes under: a JSON schema or a Lark grammar (llguidance)
    constraint: object | None = None  # the engine's compiled form of ``spec`` (:func:`with_constraint`)
    logprobs: int | None = None  # top alternatives per generated token (0: the chosen token only); None: none
    stream: bool = False
    include_usage: bool = False
    obfuscation: bool = False
    echo: bool = False

    @property
    def n(self) -> int:
        return len(self.params)


# --- limits -----------------------------------------------------------------------------------------------

def check_prompt_size(engine, texts: list[str]) -> None:
    """Refuse a prompt far past the context before spending time tokenizing it (about 4 characters a token)."""
    chars = sum(len(t) for t in texts)
    if chars > 16 * engine.context_length:
        raise APIError(400, f"This model's maximum context length is {engine.context_length} tokens, but the prompt "
                       f"has {chars} characters (far more tokens than fit). Shorten the messages or the prompt.",
                       param="messages", code="context_length_exceeded")


def token_budget(engine, server_max: int, prompt_tokens: int, requested: int | None, default: int) -> int:
    """Tokens this request may generate: what it asked for, capped by the server's maximum and the context left
    after the prompt; a prompt that leaves no room is refused."""
    context = engine.context_length
    if prompt_tokens >= context:
        raise APIError(400, f"This model's maximum context length is {context} tokens, but the prompt has "
                       f"{prompt_tokens} tokens. Shorten the messages or the prompt.", param="messages",
                       code="context_length_exceeded")
    return max(1, min(requested or default, server_max, context - prompt_tokens))


def constrained_default(spec: dict | str | None, default: int, server_max: int) -> int:
    """The budget of an answer under ``spec`` when the caller set none: its longest compact form when the
    schema bounds it, else (a grammar too) the server's maximum, so that a JSON answer is not cut at the plain
    default."""
    if spec is None:
        return default
    from tunesmith.generation.constrained import reply_token_bound

    bound = reply_token_bound(spec) if isinstance(spec, dict) else None
    return min(bound or server_max, server_max)


# --- the output constraint --------------------------------------------------------------------------------

def output_format(doc, param: str) -> OutputFormat:
    """``response_format`` (chat) or ``text.format`` (Responses) as an output format: ``text``, ``json_object``
    (any object; with a ``schema`` member, as vLLM and instructor send it, that schema), or ``json_schema``
    (strict: OpenAI's subset; otherwise any schema the decoder enforces). A schema outside is a 400 naming the
    keyword and its path in the schema."""
    from tunesmith.generation.constrained import SchemaRefused, check_output_schema, output_schema

    if doc is None:
        return OutputFormat(param=param)
    if not isinstance(doc, dict) or doc.get("type") not in ("text", "json_object", "json_schema"):
        raise APIError(400, f"{param}: type must be 'text', 'json_object' or 'json_schema'", param=param,
                       code="invalid_value")
    kind = doc["type"]
    nested = doc.get("json_schema") if param == "response_format" and kind == "json_schema" else doc
    known = {"text": {"type"}, "json_object": {"type", "schema"}}.get(kind, {"type", "json_schema"})
    if param != "response_format" and kind == "json_schema":
        known = {"type", "name", "schema", "strict", "description"}
    _refuse_unknown(doc, known, param)
    if kind == "text":
        return OutputFormat(param=param)
    if kind == "json_object" and "schema" not in doc:
        return OutputFormat(True, {"type": "object"}, output_schema({"type": "object"}), param)
    if kind == "json_schema":
        if not isinstance(nested, dict) or not isinstance(nested.get("schema", {}), dict):
            raise APIError(400, f"{param}: give json_schema with name and schema", param=param, code="invalid_value")
        if nested is not doc:
            _refuse_unknown(nested, {"name", "schema", "strict", "description"}, f"{param}.json_schema")
    schema, strict = nested.get("schema", {"type": "object"}), bool(nested.get("strict")) and kind == "json_schema"
    try:
        check_output_schema(schema, strict)
    except SchemaRefused as exc:
        name = nested.get("name", "")
        raise APIError(400, f"Invalid schema for {param} '{name}': {exc}.", param=param,
                       code="invalid_json_schema") from None
    return OutputFormat(True, schema, output_schema(schema), param)


def _refuse_unknown(doc: dict, known: set[str], param: str) -> None:
    for key in doc:
        if key not in known:
            raise APIError(400, f"Unrecognized argument supplied in {param}: {key}", param=f"{param}.{key}",
                           code="unrecognized_argument")


def constraint_spec(tool_plan: ToolPlan, output: OutputFormat) -> dict | str | None:
    """What every choice decodes under: a forced call's schema; the output format's JSON schema; with tools the
    model may call (``tool_choice`` 'auto') and a JSON output format, a grammar of either (a JSON answer or tool
    calls: what OpenAI allows, and what the Agents SDK sends for an agent with tools and an ``output_type``);
    None for free text."""
    from tunesmith.serve.plan import tools

    if tool_plan.schema is not None:
        return tool_plan.schema
    if output.json and tool_plan.parse:
        return tools.calls_or_answer(tool_plan, output.constraint)
    return output.constraint


def compile_constraint(engine, spec: dict | str, param: str):
    """The engine's form of ``spec`` (the engine keeps what it compiled); one the decoder cannot compile is the
    client's 400 on ``param``."""
    from tunesmith.errors import ConfigError

    try:
        return engine.json_constraint(spec)
    except (ConfigError, ValueError, TypeError) as exc:
        raise APIError(400, f"Invalid '{param}': the schema cannot constrain decoding: {exc}", param=param,
                       code="invalid_json_schema") from None


async def with_constraint(engine, plan: RequestPlan) -> RequestPlan:
    """The plan with its constraint compiled, off the event loop: a new schema takes milliseconds, but the
    built-in engine's first converts the tokenizer for llguidance (seconds), and no other request should wait."""
    if plan.spec is not None:
        param = plan.output.param if plan.output.json else "tools"
        plan.constraint = await asyncio.to_thread(compile_constraint, engine, plan.spec, param)
    return plan


# --- sampling ---------------------------------------------------------------------------------------------

def stream_flags(body, allowed=("include_usage", "include_obfuscation")) -> tuple[bool, bool]:
    """(include_usage, include_obfuscation) of ``stream_options``; they need ``stream``, other keys are 400s."""
    opts = body.stream_options
    if not opts:
        return False, False
    if not isinstance(opts, dict):
        raise APIError(400, "stream_options must be an object", param="stream_options")
    _refuse_unknown(opts, set(allowed), "stream_options")
    if not body.stream:
        raise APIError(400, "stream_options is only allowed when 'stream' is true", param="stream_options",
                       code="invalid_value")
    return bool(opts.get("include_usage")), bool(opts.get("include_obfuscation"))


def logit_bias(doc: dict | None, vocab: int) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as (token id, bias) pairs; a key that is no token id of the served model or a bias outside
    -100..100 is a 400 on it."""
    out = []
    for k, v in (doc or {}).items():
        if not (str(k).isdigit() and int(k) < vocab):
            raise APIError(400, f"logit_bias: '{k}' is not a token id of this model (0 to {vocab - 1})",
                           param="logit_bias", code="invalid_value")
        if not isinstance(v, (int, float)) or not -MAX_BIAS <= v <= MAX_BIAS:
            raise APIError(400, f"logit_bias: the bias of token {k} must be from -100 to 100, got {v}",
                           param="logit_bias", code="invalid_value")
        out.append((int(k), float(v)))
    return tuple(out)


def choice_params(body, engine, budget: int, n: int = 1) -> list[GenParams]:
    """One GenParams per choice: seeds ``seed + i``, the request's penalties and bias."""
    bias = logit_bias(getattr(body, "logit_bias", None), len(engine.tokenizer))
    stops = body.stops() if hasattr(body, "stops") else ()
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    return [GenParams(budget, temperature, top_p, stops, None if body.seed is None else body.seed + i,
                      getattr(body, "frequency_penalty", 0.0) or 0.0, getattr(body, "presence_penalty", 0.0) or 0.0,
                      bias) for i in range(n)]


# --- the three request kinds ------------------------------------------------------------------------------

def chat_plan(body, engine, server_max: int, output: OutputFormat | None = None,
              messages_param: str = "messages") -> RequestPlan:
    """A chat completion's plan: messages and tools rendered as the model was trained, a forced call or
    ``response_format`` as the constraint. Responses come through here too, as a chat body with their
    ``text.format`` as ``output`` (errors then name ``input`` for the messages)."""
    from tunesmith.serve.plan import tools

    tool_plan = tools.plan_tools(body)
    output = output or output_format(body.response_format, "response_format")
    if output.schema == {"type": "object"} and not any("json" in m.text().lower() for m in body.messages):
        raise APIError(400, f"'{messages_param}' must contain the word 'json' in some form, to use "
                       f"'{output.param}' of type 'json_object'.", param=messages_param, code="invalid_value")
    messages = tools.request_messages(body)
    check_prompt_size(engine, [m.text() for m in body.messages])
    ids = tools.prompt_ids(engine, messages, tool_plan)
    requested = body.max_completion_tokens or body.max_tokens
    plan = RequestPlan(body.model, [ids], [], tool_plan, output, constraint_spec(tool_plan, output),
                       stream=body.stream, logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    default = constrained_default(plan.spec, CHAT_DEFAULT_MAX, server_max)
    budget = token_budget(engine, server_max, len(ids), requested, default)
    plan.params = choice_params(body, engine, tools.token_budget(tool_plan, budget), body.n)
    plan.include_usage, plan.obfuscation = stream_flags(body)
    return plan


def completion_plan(body, engine, server_max: int) -> RequestPlan:
    """A text completion's plan: each prompt as it is (no template), ``n`` choices each, logprobs 0..5."""
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs is not served: this server reports no prompt logprobs",
                       param="echo", code="unsupported_parameter")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of must equal n here (one generation per choice)", param="best_of",
                       code="unsupported_parameter")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    check_prompt_size(engine, prompts)
    encoded = [engine.text_prompt_ids(p) for p in prompts]
    budget = min(token_budget(engine, server_max, len(ids), body.max_tokens, COMPLETION_DEFAULT_MAX) for ids in encoded)
    plan = RequestPlan(body.model, encoded, choice_params(body, engine, budget, body.n), stream=body.stream,
                       logprobs=body.logprobs, echo=body.echo)
    plan.include_usage, plan.obfuscation = stream_flags(body)
    return plan
