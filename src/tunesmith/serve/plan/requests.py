"""One request plan per generation request, built in one pass: :func:`chat_plan`, :func:`completion_plan` and
:func:`response_plan` each turn a body into a :class:`RequestPlan`.

A plan says everything the engines and the answer need: the prompts as token ids, each choice's sampling
settings (token budget, penalties, bias, seed), the one output constraint (a forced tool call's JSON,
``response_format`` or Responses' ``text.format``: a JSON schema or grammar the answer decodes under) compiled by
the engine, how the answer is read (text, JSON content or tool calls), logprobs, ``n`` and the stream options.
Each builder calls the helpers of this room in order (:mod:`.messages`, :mod:`.tools`, :mod:`.output`,
:mod:`.sampling`), none of which calls back here; the routes run a builder off the event loop under a deadline
(:func:`build`), hand the plan to an engine (:meth:`tunesmith.serve.engines.interface.InferenceEngine.run`) and read
its generations through it (:meth:`RequestPlan.reader`, :meth:`RequestPlan.message`). Every field the request sent
has been checked against :mod:`tunesmith.serve.plan.fields` first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunesmith.generation import GenParams
from tunesmith.serve.errors import APIError
from tunesmith.serve.lanes import TooCostly
from tunesmith.serve.plan import answer, tools
from tunesmith.serve.plan.messages import chat_messages, chat_tools, check_text, input_messages
from tunesmith.serve.plan.output import OutputFormat, output_format
from tunesmith.serve.plan.prompts import completion_prompts
from tunesmith.serve.plan.sampling import (
    CHAT_DEFAULT_MAX,
    COMPLETION_DEFAULT_MAX,
    answer_budget,
    check_prompt_size,
    choice_params,
    stream_flags,
    token_budget,
)
from tunesmith.serve.plan.schemas import ChatCompletionBody
from tunesmith.serve.plan.tools import ToolPlan

RESPONSE_LOGPROBS = "message.output_text.logprobs"  # Responses' ``include`` value that asks for logprobs
PLAN_CPU_S = 30.0  # CPU seconds a request's plan may spend (tokenizing, compiling its schema): past it, a 400
PLAN_DEADLINE_S = 120.0  # seconds a plan may take however busy the machine: past it, a 503
IGNORED_HEADER = "x-tunesmith-ignored-keywords"


@dataclass
class RequestPlan:
    model: str
    prompts: list[list[int]]
    params: list[GenParams]  # one per choice (n), the same for every prompt
    tools: ToolPlan = field(default_factory=ToolPlan)
    output: OutputFormat = field(default_factory=OutputFormat)
    spec: dict | str | None = None  # what every choice decodes under: a JSON schema or a Lark grammar (llguidance)
    constraint: object | None = None  # the engine's compiled form of ``spec``
    logprobs: int | None = None  # top alternatives per generated token (0: the chosen token only); None: none
    prompt_logprobs: int | None = None  # the same for every prompt token (a completion's echo with logprobs)
    texts: list[str] = field(default_factory=list)  # each prompt as text (a completion's echo)
    stream: bool = False
    include_usage: bool = False
    obfuscation: bool = False
    echo: bool = False
    conversation: list[dict] = field(default_factory=list)  # the chat messages the prompt was rendered from

    @property
    def n(self) -> int:
        return len(self.params)

    @property
    def cost(self) -> int:
        """Tokens the request asks for, as OpenAI's rate limits count them: every prompt, and the most every
        choice may generate."""
        return sum(len(ids) for ids in self.prompts) + len(self.prompts) * sum(p.max_tokens for p in self.params)

    def reader(self) -> answer.ChoiceDeltas:
        """A reader of one choice's text as it streams: OpenAI chat deltas (content or tool calls)."""
        return answer.ChoiceDeltas(self.tools)

    def message(self, text: str) -> tuple[dict, bool]:
        """A whole answer as an assistant message, and whether it called tools."""
        return answer.message(self.tools, text)

    def completion_choice(self, index: int, gen) -> dict:
        """Choice ``index`` of a text completion: the echoed prompt (scored, when asked) and the answer."""
        return answer.completion_choice(self, index, gen)

    @staticmethod
    def completion_logprobs(entries: list[dict] | None, start: int = 0) -> dict | None:
        """Streamed tokens' logprobs entries as a completion chunk's ``logprobs``, offsets from ``start``."""
        return answer.completion_logprobs(entries, start)

    def headers(self) -> dict[str, str]:
        """Response headers the plan adds: the schema keywords ignored as annotations (``keyword at path``, the
        first 20), so that a caller can see what the answer was not held to."""
        if not self.output.ignored:
            return {}
        shown = self.output.ignored[:20] + (["…"] if len(self.output.ignored) > 20 else [])
        return {IGNORED_HEADER: ", ".join(shown).encode("ascii", "backslashreplace").decode()[:2000]}


# --- the three request kinds ------------------------------------------------------------------------------

def chat_plan(body: ChatCompletionBody, engine, server_max: int) -> RequestPlan:
    """A chat completion's plan: messages and tools rendered as the model was trained, a forced call or
    ``response_format`` as the constraint."""
    output = output_format(body.response_format, "response_format")
    include_usage, obfuscation = stream_flags(body.stream_options, body.stream)
    return _conversation_plan(body, engine, server_max, output, "messages", include_usage, obfuscation)


def response_plan(body, earlier: list[dict], engine, server_max: int) -> RequestPlan:
    """A Responses request's plan: ``earlier`` (the turns of ``previous_response_id``) and its ``input`` as the
    conversation, ``instructions`` as the system message, its function tools and ``text.format`` planned as a
    chat request's (errors name ``input`` for the messages)."""
    text = body.text or {}
    if set(text) - {"format", "verbosity"}:
        raise APIError(400, f"Unrecognized argument supplied in text: {sorted(set(text) - {'format', 'verbosity'})[0]}",
                       param="text", code="unrecognized_argument")
    if text.get("verbosity") not in (None, "medium"):
        raise APIError(400, "text.verbosity: the answer's length follows max_output_tokens; send null or 'medium'",
                       param="text.verbosity", code="unsupported_parameter")
    turns = [*earlier, *input_messages(body.input)]
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    chat_tools_, choice = chat_tools(body)
    logprobs = RESPONSE_LOGPROBS in (body.include or []) or body.top_logprobs is not None
    chat = ChatCompletionBody(model=body.model, messages=[*system, *turns], tools=chat_tools_, tool_choice=choice,
                              parallel_tool_calls=body.parallel_tool_calls, stream=body.stream,
                              temperature=body.temperature, top_p=body.top_p,
                              max_tokens=body.max_output_tokens or None, logprobs=logprobs,
                              top_logprobs=body.top_logprobs if logprobs else None)
    output = output_format(text.get("format"), "text.format")
    obfuscation = stream_flags(body.stream_options, body.stream, ("include_obfuscation",))[1]
    plan = _conversation_plan(chat, engine, server_max, output, "input", False, obfuscation)
    plan.conversation = turns
    return plan


def completion_plan(body, engine, server_max: int) -> RequestPlan:
    """A text completion's plan: each prompt as it is (text with no template, or token ids), ``n`` choices each,
    logprobs 0..5; ``echo`` with ``logprobs`` scores the prompt too (its tokens' logprobs, in the prefill's own pass),
    and with ``max_tokens: 0`` the prompt alone."""
    scoring = check_scoring(body)
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of must equal n here (one generation per choice)", param="best_of",
                       code="unsupported_parameter")
    include_usage, obfuscation = stream_flags(body.stream_options, body.stream)
    texts, encoded = completion_prompts(body.prompt, engine)
    budget = min(token_budget(engine, server_max, len(ids), body.max_tokens, COMPLETION_DEFAULT_MAX) for ids in encoded)
    return RequestPlan(body.model, encoded, choice_params(body, engine, 0 if body.max_tokens == 0 else budget, body.n),
                       stream=bool(body.stream), logprobs=body.logprobs, echo=bool(body.echo),
                       prompt_logprobs=body.logprobs if scoring else None, texts=texts, include_usage=include_usage,
                       obfuscation=obfuscation)


def check_scoring(body) -> bool:
    """Whether a completion scores its prompt (``echo`` with ``logprobs``): its answer comes whole, not streamed.
    Only an echo may generate nothing (``max_tokens: 0``: the prompt alone, scored with ``logprobs``)."""
    scoring = bool(body.echo) and body.logprobs is not None
    if scoring and body.stream:
        raise APIError(400, "echo with logprobs scores the prompt in one answer: send stream false (or leave out echo)",
                       param="stream", code="unsupported_parameter")
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens 0 generates nothing: send echo true (with logprobs, to score the prompt "
                       "alone), or max_tokens of 1 or more", param="max_tokens", code="invalid_value")
    return scoring


def _conversation_plan(body: ChatCompletionBody, engine, server_max: int, output: OutputFormat, messages_param: str,
                       include_usage: bool, obfuscation: bool) -> RequestPlan:
    """The steps chat and Responses share, in order: tools → the conversation → the prompt's ids → what the
    answer decodes under (compiled) → the budget → each choice's sampling."""
    tool_plan = tools.plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls, body.model_extra)
    texts = [m.text() for m in body.messages]
    messages = chat_messages(body)
    check_text(messages, messages_param)
    check_text(body.tools, "tools")
    check_prompt_size(engine, texts, messages_param)
    ids = tools.prompt_ids(engine, messages, tool_plan)
    spec = constraint_spec(tool_plan, output)
    constraint = None if spec is None else compile_constraint(engine, spec, output.param if output.json else "tools")
    budget = answer_budget(engine, server_max, len(ids), body.max_completion_tokens or body.max_tokens,
                           CHAT_DEFAULT_MAX, spec)
    return RequestPlan(body.model, [ids], choice_params(body, engine, budget, body.n), tool_plan, output, spec,
                       constraint, logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                       stream=bool(body.stream), include_usage=include_usage, obfuscation=obfuscation,
                       conversation=messages)


# --- the output constraint --------------------------------------------------------------------------------

def constraint_spec(tool_plan: ToolPlan, output: OutputFormat) -> dict | str | None:
    """What every choice decodes under: a forced call's schema; the output format's JSON schema; with tools the
    model may call (``tool_choice`` 'auto') and a JSON output format, a grammar of either (a JSON answer or tool
    calls: what OpenAI allows, and what the Agents SDK sends for an agent with tools and an ``output_type``);
    None for free text."""
    if tool_plan.schema is not None:
        return tool_plan.schema
    if output.json and tool_plan.parse:
        return tools.calls_or_answer(tool_plan, output.constraint)
    return output.constraint


def compile_constraint(engine, spec: dict | str, param: str):
    """The engine's form of ``spec`` (the engine keeps what it compiled); one the decoder cannot compile is the
    client's 400 on ``param``, naming the keyword and its path where the decoder says which. The builtin engine's
    first compile converts the tokenizer for llguidance (seconds): one reason the routes build plans off the event
    loop."""
    from tunesmith.errors import ConfigError
    from tunesmith.generation.schemas import located

    try:
        return engine.json_constraint(spec)
    except (ConfigError, ValueError, TypeError) as exc:
        said = str(exc).removeprefix("schema not usable for constrained decoding: ")
        why = located(spec, said) if isinstance(spec, dict) else f"the grammar cannot constrain decoding: {said}"
        raise APIError(400, f"Invalid schema for '{param}': {why}.", param=param, code="invalid_json_schema") from None


# --- building off the event loop --------------------------------------------------------------------------

async def build(builder, *args, lane, key, cpu_s: float = PLAN_CPU_S, deadline_s: float = PLAN_DEADLINE_S
                ) -> RequestPlan:
    """``builder(*args)`` in the planning lane as ``key``'s work (:mod:`tunesmith.serve.lanes`), so that no other
    request waits on this one's tokenizing and compiling. A plan that spends ``cpu_s`` of CPU time is the client's
    400 (its schema or tools cost too much); one merely slow because the machine is busy is not, up to
    ``deadline_s`` from its start, past which it is a 503 to retry. Either way its thread finishes on its own, in the
    key's share of the lane."""
    try:
        return await lane.run(key, builder, *args, cpu_s=cpu_s, deadline_s=deadline_s)
    except TooCostly:
        raise APIError(400, f"The request could not be planned within {cpu_s:.0f} s of CPU time (its schema or "
                       "tools are too costly to compile); simplify them.", code="request_too_complex") from None
    except TimeoutError:
        raise APIError(503, f"The server is too busy to plan this request within {deadline_s:.0f} s; retry in a "
                       "minute.", type_="server_error", code="server_busy", headers={"retry-after": "60"}) from None
