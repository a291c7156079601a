"""What tunesmith sends vLLM and reads back: a choice's ``/v1/completions`` body, its answer (text, finish reason,
usage, logprobs as OpenAI's chat shape, over every part a paused row was sent in) and vLLM's errors as ours."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from tunesmith.serve.engines.interface import Generation, GenParams
from tunesmith.serve.errors import APIError

if TYPE_CHECKING:
    from tunesmith.serve.engines.vllm.sharing import Row


def completion_body(model: str, prompt_ids: list[int], p: GenParams, constraint, logprobs) -> dict:
    """A choice as vLLM's completions request: always streamed (with its token ids, :meth:`Row.continuation`), so
    that tunesmith sees each row's first token (its prefill done) and what a paused row generated."""
    body = {"model": model, "prompt": prompt_ids, "max_tokens": p.max_tokens, "temperature": p.temperature,
            "top_p": p.top_p, "stop": list(p.stop), "stream": True}
    if p.seed is not None:
        body["seed"] = p.seed
    if p.frequency_penalty or p.presence_penalty:
        body |= {"frequency_penalty": p.frequency_penalty, "presence_penalty": p.presence_penalty}
    if p.logit_bias:
        body["logit_bias"] = {str(t): b for t, b in p.logit_bias}
    if constraint is not None:
        body["structured_outputs"] = constraint
    if logprobs is not None:
        body["logprobs"] = logprobs
    return body


def generation(choice: dict, usage: dict) -> Generation:
    finish = choice.get("finish_reason") if choice.get("finish_reason") in ("stop", "length") else "stop"
    return Generation(choice.get("text") or "", usage["prompt_tokens"], usage["completion_tokens"], finish,
                      chat_logprobs(choice.get("logprobs")))


def answer(row: Row) -> Generation:
    """A row's whole answer over every part it was sent in (more than one when it was paused): the original
    prompt's tokens and every generated token counted."""
    return generation({"text": "".join(row.text), "finish_reason": row.finish, "logprobs": merged_logprobs(row.logprobs)},
                      {"prompt_tokens": len(row.body["prompt"]), "completion_tokens": len(row.generated)})


def chat_logprobs(lp: dict | None) -> list[dict] | None:
    """vLLM's completions logprobs (tokens, token_logprobs, top_logprobs) as chat ``logprobs.content``."""
    if not lp or not lp.get("tokens"):
        return None

    def entry(token: str, logprob: float | None) -> dict:
        value = -9999.0 if logprob is None else max(float(logprob), -9999.0)  # OpenAI's floor for -inf
        return {"token": token, "logprob": value, "bytes": list(token.encode())}

    out = []
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp.get("top_logprobs") or [],
                                   strict=False):
        ranked = sorted((top or {}).items(), key=lambda kv: -kv[1])
        out.append(entry(token, logprob) | {"top_logprobs": [entry(t, v) for t, v in ranked]})
    return out


def merged_logprobs(parts: list[dict | None]) -> dict | None:
    """A streamed answer's logprobs pieces as one completions logprobs object."""
    parts = [p for p in parts if p]
    if not parts:
        return None
    return {k: [x for p in parts for x in (p.get(k) or [])] for k in ("tokens", "token_logprobs", "top_logprobs")}


def error_message(text: str) -> str:
    try:
        doc = json.loads(text)
    except ValueError:
        return text[:500]
    doc = doc.get("error", doc) if isinstance(doc, dict) else {}
    return str(doc.get("message") or text)[:2000]


def vllm_error(status: int, text: str) -> APIError:
    """vLLM's error (``{"error": {...}}`` or the older flat shape) as ours, its status and message kept."""
    try:
        doc = json.loads(text)
        doc = doc.get("error", doc)
    except (ValueError, AttributeError):
        doc = {}
    status = int(status) if str(status).isdigit() and 400 <= int(status) < 600 else 500
    if status >= 500:
        return APIError(status, f"The inference engine (vLLM) failed: {error_message(text)}", type_="server_error",
                        code="engine_error")
    param = doc.get("param") if isinstance(doc, dict) else None
    return APIError(status, error_message(text), param=param if isinstance(param, str) else None)


def timed_out(limit_s: float) -> APIError:
    return APIError(504, f"The generation took longer than the server's {limit_s:.0f} s limit.", type_="server_error",
                    code="timeout")


def engine_failed(exc: Exception) -> APIError:
    return APIError(502, f"The inference engine (vLLM) failed on this request: {type(exc).__name__}: {exc}"[:2000],
                    type_="server_error", code="engine_error")


def shutting_down() -> APIError:
    return APIError(503, "The server is shutting down; retry on another instance.", type_="server_error",
                    code="server_shutting_down")


def unavailable() -> APIError:
    return APIError(503, "The inference engine (vLLM) is restarting after it stopped; retry in a minute.",
                    type_="server_error", code="engine_unavailable")
