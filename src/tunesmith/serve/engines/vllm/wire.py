"""What tunesmith sends vLLM and reads back: a choice's ``/v1/completions`` body, its answer (text, finish reason,
usage, logprobs as OpenAI's chat shape, over every part a paused row was sent in; a scored prompt's logprobs, which
vLLM computes for an ``echo`` with ``logprobs``; the generation as token ids, when asked) and vLLM's errors as ours.

What vLLM 0.32 does with the tokens that end a row: its ``token_ids`` (and its logprobs) list the token that ended
it last, whether the model's end of sequence or one of ``stop_token_ids`` (``stop_reason`` then that id), and its
text leaves it out. ``ignore_eos`` keeps the end of sequence from ending a row, not ``stop_token_ids`` (checked
whatever ``ignore_eos``); a token that ended nothing (an end of sequence under ``ignore_eos``) is text, special
tokens skipped."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tunesmith.generation import TokenLogprob
from tunesmith.serve.engines.interface import Generation, GenParams, TokenIds
from tunesmith.serve.errors import APIError

if TYPE_CHECKING:
    from tunesmith.serve.engines.vllm.sharing import Row


TOKEN_ID = "token_id:"  # how vLLM names a token by its id (``return_tokens_as_token_ids``)


@dataclass(frozen=True)
class IdsAsked:
    """What a row's :class:`TokenIds` hold (``submit(token_ids=True)``): its tokens' logprobs when ``logprobs``; its
    scored prompt's entries with ``prompt`` alternatives each (None: the prompt is not scored)."""

    logprobs: bool
    prompt: int | None


def completion_body(model: str, prompt_ids: list[int], p: GenParams, constraint, logprobs,
                    prompt_logprobs: int | None = None, ids: IdsAsked | None = None) -> dict:
    """A choice as vLLM's completions request: always streamed (with its token ids, :meth:`Row.continuation`), so
    that tunesmith sees each row's first token (its prefill done) and what a paused row generated. A scored prompt is
    an ``echo`` with ``logprobs`` (vLLM's prompt logprobs, in its first chunk; ``max_tokens`` 0: the prompt alone);
    with ``ids`` its tokens are named by id, so that each one's alternatives are ids (:func:`named_by_text` names
    them as text again for OpenAI's entries)."""
    body = {"model": model, "prompt": prompt_ids, "max_tokens": p.max_tokens, "temperature": p.temperature,
            "top_p": p.top_p, "stop": list(p.stop), "stream": True} | sampling_extras(p)
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
    if prompt_logprobs is not None:
        body |= {"echo": True, "logprobs": max(logprobs or 0, prompt_logprobs)}
        if ids is not None:
            body["return_tokens_as_token_ids"] = True
    return body


def sampling_extras(p: GenParams) -> dict:
    """vLLM's own sampling fields for what OpenAI's completions lack: ``top_k`` when set (vLLM applies it after
    temperature, as the built-in engine does), and the tokens that end the row when named: exactly
    ``stop_token_ids``, ``ignore_eos`` so that the model's end of sequence does not end it unless listed (vLLM then
    leaves out the generation config's end ids as well). Nothing for the defaults: the body stays OpenAI's."""
    extras: dict = {"top_k": p.top_k} if p.top_k > 0 else {}
    if p.stop_token_ids is not None:
        extras |= {"stop_token_ids": list(p.stop_token_ids), "ignore_eos": True}
    return extras


def answer(row: Row) -> Generation:
    """A row's whole answer over every part it was sent in (more than one when it was paused): the original
    prompt's tokens and every generated token counted; the token that ended it (which vLLM lists as a token) kept
    apart in the logprobs, as the built-in engine keeps it; its token ids when asked."""
    finish = row.finish if row.finish in ("stop", "length") else "stop"
    asked = "logprobs" in row.body
    entries = (chat_logprobs(merged_logprobs(row.logprobs)) or []) if asked else None
    return Generation("".join(row.text), len(row.body["prompt"]), len(row.generated), finish, entries,
                      (chat_logprobs(row.end) or [None])[0], prompt_entries(row.prompt_logprobs),
                      token_ids(row) if row.ids is not None else None)


def token_ids(row: Row) -> TokenIds:
    """A row's generation as ids: the tokens vLLM generated (the stop token that ended it last: vLLM lists it), each
    one's logprob (vLLM's raw log-softmax, before any sampling setting) when asked, and the scored prompt's entries
    (:attr:`Row.prompt_ids`)."""
    logprobs = None
    if row.ids.logprobs:
        lp = merged_logprobs([*row.logprobs, row.end]) or {}
        logprobs = [float(v) for v in lp.get("token_logprobs") or []]
    return TokenIds(list(row.generated), logprobs, row.prompt_ids)


def prompt_token_ids(lp: dict, prompt: list[int], k: int) -> list[TokenLogprob]:
    """A scored prompt's logprobs (vLLM's echo, its tokens named by id) as one entry per prompt token after the first
    (nothing comes before it): the token, its logprob and its ``k`` most probable alternatives as ids (vLLM lists the
    token itself among them, one more than asked)."""
    out = []
    for token, logprob, top in zip(prompt[1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
        ranked = sorted(((token_id(t), float(v)) for t, v in (top or {}).items()), key=lambda kv: -kv[1])
        out.append(TokenLogprob(token, float(logprob), tuple(ranked[:k])))
    return out


def token_id(name: str) -> int:
    """A token's id from vLLM's name for it (``token_id:N``)."""
    return int(name.removeprefix(TOKEN_ID))


def named_by_text(lp: dict | None, decode) -> dict | None:
    """A completions logprobs object whose tokens vLLM named by id, with each token named by its text instead
    (``decode``: a token id's text, as the built-in engine names it, and vLLM a byte-level vocabulary's), so that
    OpenAI's entries read as without ids."""
    if not lp:
        return lp

    def text(name: str) -> str:
        return decode(token_id(name)) if name.startswith(TOKEN_ID) else name

    tops = [None if top is None else {text(t): v for t, v in top.items()} for top in lp.get("top_logprobs") or []]
    return {**lp, "tokens": [text(t) for t in lp.get("tokens") or []], "top_logprobs": tops}


def prompt_entries(lp: dict | None) -> list[dict] | None:
    """A scored prompt's logprobs (vLLM's echo) as chat entries, its first token's logprob None (vLLM's null)."""
    if lp is None:
        return None
    entries = chat_logprobs(lp) or []
    if entries and lp["token_logprobs"][0] is None:
        entries[0] |= {"logprob": None, "top_logprobs": None}
    return entries


def split_logprobs(lp: dict, at: int) -> tuple[dict, dict]:
    """A completions ``logprobs`` object cut in two before entry ``at``."""
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {k: (lp.get(k) or [])[:at] for k in keys}, {k: (lp.get(k) or [])[at:] for k in keys}


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
