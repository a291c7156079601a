"""Request bodies of the OpenAI-compatible routes (responses are plain dicts in OpenAI's shapes)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_STOPS = 4  # as OpenAI
MAX_MESSAGES = 2048
MAX_PROMPTS = 32  # prompts in one /v1/completions request
MAX_TOP_LOGPROBS = 20  # as OpenAI
MAX_COMPLETION_LOGPROBS = 5  # as OpenAI: alternatives per token of a completion (and of its prompt, with echo)
PROMPT_FORMS = "a string, an array of strings, an array of token ids or an array of token-id arrays"


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = Field(None, validate_default=True)

    @field_validator("content")
    @classmethod
    def _content_unless_assistant(cls, v, info: ValidationInfo):
        """Only an assistant message (one that called tools) may come without content, as at OpenAI."""
        role = info.data.get("role")
        if v is None and role is not None and role != "assistant":
            raise ValueError(f"a {role} message needs content (a string or a list of content parts), got null")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class SamplingBody(BaseModel):
    # other fields land in model_extra, where tunesmith.serve.plan.fields decides each: honoured or a 400
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=8)
    stream: bool | None = False
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with the usage
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id -> bias, checked against the model's vocabulary

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, v):
        if isinstance(v, list) and len(v) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences are allowed, got {len(v)}")
        return v

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionBody(SamplingBody):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False  # answered by classifier heads (label probabilities); generated text has none
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict] | None = None  # checked, with tool_choice, by tunesmith.serve.plan.tools
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None  # text, json_object or json_schema: tunesmith.serve.plan.requests
    store: bool | None = None  # keep the request and its answer (tunesmith.serve.api.stored_completions)
    metadata: dict | None = None  # pairs kept with a stored completion (checked there)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v, info: ValidationInfo):
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("set logprobs: true to ask for top_logprobs (as at OpenAI)")
        return v


class CompletionBody(SamplingBody):
    prompt: str | list[str] | list[int] | list[list[int]]  # OpenAI's four forms (ids checked by the plan)
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: the prompt scored alone (checked by the plan)
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_form(cls, v):
        return prompt_form(v)


def prompt_form(v):
    """A completion's prompt in one of the forms of OpenAI's spec: a string, an array of 1 to 32 strings, an array of
    token ids (one prompt), or an array of 1 to 32 non-empty token-id arrays; anything else is refused naming the
    first item out of form (its first item decides which form the array is)."""
    if isinstance(v, str):
        return v
    if not isinstance(v, list) or not v:
        raise ValueError(f"give {PROMPT_FORMS}")
    forms = (("token id", _token_id), ("string", lambda x: isinstance(x, str)),
             ("token-id array", lambda x: isinstance(x, list)))
    kind, is_kind = next(((k, f) for k, f in forms if f(v[0])), (None, None))
    if kind is None:
        raise ValueError(f"prompt[0] is {_shown(v[0])}: give {PROMPT_FORMS}")
    for i, x in enumerate(v):
        if not is_kind(x):
            raise ValueError(f"prompt[{i}] is {_shown(x)}, but prompt[0] is a {kind}: an array holds one form, "
                             f"{PROMPT_FORMS}")
    if kind != "token id" and len(v) > MAX_PROMPTS:
        raise ValueError(f"give 1 to {MAX_PROMPTS} prompts, got {len(v)}")
    for i, ids in enumerate(v if kind == "token-id array" else ()):
        if not ids:
            raise ValueError(f"prompt[{i}] is an empty token array: give at least one token id")
        if not all(_token_id(t) for t in ids):
            j = next(j for j, t in enumerate(ids) if not _token_id(t))
            raise ValueError(f"prompt[{i}][{j}] is {_shown(ids[j])}, not a token id (an integer)")
    return v


def _shown(x) -> str:
    return f"{type(x).__name__} {str(x)[:40]!r}"


def _token_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class ResponseBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # other fields: tunesmith.serve.plan.fields decides each
    model: str
    input: str | list[dict]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool | None = False
    stream_options: dict | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(None, ge=1)
    previous_response_id: str | None = None
    store: bool | None = True
    text: dict | None = None
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
