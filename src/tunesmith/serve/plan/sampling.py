"""How much a request may generate and how each choice samples: the prompt's size checked against the context,
the token budget, each choice's sampling settings (seed, penalties, logit bias, stops) and the stream options."""

from __future__ import annotations

from tunesmith.generation import GenParams
from tunesmith.serve.errors import APIError
from tunesmith.serve.plan.fields import refuse_unknown
from tunesmith.serve.store import values

CHAT_DEFAULT_MAX = 256
COMPLETION_DEFAULT_MAX = 16
MAX_BIAS = 100


def check_prompt_size(engine, texts: list[str], param: str = "messages") -> None:
    """Refuse a prompt far past the context before spending time tokenizing it (about 4 characters a token)."""
    chars = sum(len(t) for t in texts)
    if chars > 16 * engine.context_length:
        raise APIError(400, f"This model's maximum context length is {engine.context_length} tokens, but the prompt "
                       f"has {chars} characters (far more tokens than fit). Shorten the messages or the prompt.",
                       param=param, code="context_length_exceeded")


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
    """The budget of an answer under ``spec`` when the caller set none: its longest compact form and the end of
    sequence after it when the schema (or a grammar that knows it: a forced call's) bounds it, else the server's
    maximum, so that a JSON answer is not cut at the plain default."""
    if spec is None:
        return default
    from tunesmith.generation.constrained import reply_token_bound

    bound = reply_token_bound(spec) if isinstance(spec, dict) else getattr(spec, "token_bound", None)
    return min(server_max if bound is None else bound + 1, server_max)


def answer_budget(engine, server_max: int, prompt_tokens: int, requested: int | None, default: int,
                  spec: dict | str | None) -> int:
    """The tokens each choice may generate: the caller's ``max_tokens``, or the default (a constrained answer's
    default is its longest form, a forced call's included), always within the server's maximum and the context.
    A constrained answer cut by that budget ends with ``finish_reason: "length"``, as at OpenAI."""
    return token_budget(engine, server_max, prompt_tokens, requested, constrained_default(spec, default, server_max))


MAX_SEED = 2**63 - 1  # what both engines take (vLLM reads -1 as "no seed")


def check_seed(seed: int | None, n: int) -> None:
    """A seed both engines accept for every choice (``seed + i``); anything else is a 400 on ``seed``."""
    values.check_seed(seed, "seed", MAX_SEED - (n - 1))


def stream_flags(options, stream: bool | None, allowed=("include_usage", "include_obfuscation")) -> tuple[bool, bool]:
    """(include_usage, include_obfuscation) of ``stream_options``; they need ``stream``, other keys are 400s."""
    if not options:
        return False, False
    if not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", param="stream_options")
    refuse_unknown(options, set(allowed), "stream_options")
    if not stream:
        raise APIError(400, "stream_options is only allowed when 'stream' is true", param="stream_options",
                       code="invalid_value")
    return bool(options.get("include_usage")), bool(options.get("include_obfuscation"))


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
    check_seed(body.seed, n)
    bias = logit_bias(getattr(body, "logit_bias", None), len(engine.tokenizer))
    stops = body.stops() if hasattr(body, "stops") else ()
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    return [GenParams(budget, temperature, top_p, stops, None if body.seed is None else body.seed + i,
                      getattr(body, "frequency_penalty", 0.0) or 0.0, getattr(body, "presence_penalty", 0.0) or 0.0,
                      bias) for i in range(n)]
