"""OpenAI-compatible inference routes: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from tunesmith.serve.engine import Generation, GenParams
from tunesmith.serve.errors import APIError
from tunesmith.serve.schemas import ChatCompletionBody, CompletionBody, SamplingBody

router = APIRouter(prefix="/v1")


def api_key(request: Request) -> str | None:
    """The caller's key (it scopes files and jobs); 401 when keys are configured and it is wrong."""
    keys = request.app.state.settings.api_keys
    header = request.headers.get("authorization", "")
    key = header[7:].strip() if header.lower().startswith("bearer ") else None
    if keys and key not in keys:
        raise APIError(401, "Missing or invalid API key. Send 'Authorization: Bearer <key>'.", code="invalid_api_key")
    return key


Key = Annotated[str | None, Depends(api_key)]


def visible_models(request: Request, key: str | None) -> list[str]:
    """The base model and command-line adapters, plus the fine-tuned models of this key's own jobs."""
    request.app.state.sync_adapters()
    owners = request.app.state.model_owners
    return [m for m in request.app.state.engine.model_ids() if m not in owners or owners[m] == key]


def _engine(request: Request, model: str, key: str | None):
    models = visible_models(request, key)
    if model not in models and not request.app.state.serve_checkpoint(model, key):
        raise APIError(404, f"The model '{model}' does not exist or you do not have access to it. "
                       f"Available: {', '.join(models)}", param="model", code="model_not_found")
    return request.app.state.engine


def _token_budget(request: Request, engine, prompt_tokens: int, requested: int | None, default: int) -> int:
    """Tokens this request may generate: what it asked for, capped by the server's maximum and the
    context left after the prompt; a prompt that leaves no room is refused."""
    context = engine.context_length
    if prompt_tokens >= context:
        raise APIError(400, f"This model's maximum context length is {context} tokens, but the prompt has "
                       f"{prompt_tokens} tokens. Shorten the messages or the prompt.", param="messages",
                       code="context_length_exceeded")
    server_max = request.app.state.settings.max_tokens
    return max(1, min(requested or default, server_max, context - prompt_tokens))


def _check_prompt_size(engine, texts: list[str]) -> None:
    """Refuse a prompt far past the context before spending time tokenizing it (about 4 characters a token)."""
    chars = sum(len(t) for t in texts)
    if chars > 16 * engine.context_length:
        raise APIError(400, f"This model's maximum context length is {engine.context_length} tokens, but the prompt "
                       f"has {chars} characters (far more tokens than fit). Shorten the messages or the prompt.",
                       param="messages", code="context_length_exceeded")


def _params(body: SamplingBody, max_tokens: int) -> list[GenParams]:
    return [GenParams(max_tokens, body.temperature, body.top_p, body.stops(),
                      None if body.seed is None else body.seed + i) for i in range(body.n)]


def _logprobs(gen: Generation) -> dict | None:
    """A choice's ``logprobs`` (``content``: one entry per generated token) where the engine reports them."""
    return None if gen.logprobs is None else {"content": gen.logprobs, "refusal": None}


def _usage(gens: list[Generation]) -> dict:
    prompt = gens[0].prompt_tokens if gens else 0
    completion = sum(g.completion_tokens for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@router.get("/models")
async def list_models(request: Request, key: Key):
    """Each model in OpenAI's shape; an adapter names its base model as ``parent`` (as vLLM does), which tells
    an evaluator that it serves a fine-tune, to be asked as it was trained. A trained head also names its
    kind (``head``: classifier, regression or span; a tunesmith extension), so the dashboard knows which
    models have label probabilities to show."""
    created = int(time.time())
    engine = request.app.state.engine
    base = engine.model_ids()[0]

    def entry(m: str) -> dict:
        doc = {"id": m, "object": "model", "created": created, "owned_by": "tunesmith", "parent": None if m == base else base}
        return (doc | {"head": engine.heads[m].kind}) if m in engine.heads else doc

    return {"object": "list", "data": [entry(m) for m in visible_models(request, key)]}


async def _results(request: Request, jobs: list) -> list[list[Generation]]:
    """Every job's generations; when the client goes away its rows leave the batch at the next step."""
    task = asyncio.ensure_future(asyncio.gather(*(j.results() for j in jobs)))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(400, "The client closed the connection.", code="client_disconnected")
    finally:
        for j in jobs:
            j.cancel()
        task.cancel()


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionBody, request: Request, key: Key):
    from tunesmith.serve import tools

    engine = _engine(request, body.model, key)
    plan = tools.plan_tools(body)
    messages = tools.request_messages(body)
    _check_prompt_size(engine, [m.text() for m in body.messages])
    if body.model in engine.heads:
        from tunesmith.serve.heads import chat_reply

        plain = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        return await chat_reply(engine.heads[body.model], body, plain)
    ids = tools.prompt_ids(engine, messages, plan)
    budget = _token_budget(request, engine, len(ids), body.max_completion_tokens or body.max_tokens, 256)
    job = engine.submit(body.model, ids, _params(body, tools.token_budget(plan, budget)), stream=body.stream,
                        constraint=tools.constraint(engine, plan),
                        logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if body.stream:
        return StreamingResponse(_sse_chat(job, body, cid, created, plan), media_type="text/event-stream")
    [gens] = await _results(request, [job])
    choices = []
    for i, g in enumerate(gens):
        msg, called = tools.message(plan, g.text)
        choices.append({"index": i, "message": msg, "finish_reason": "tool_calls" if called else g.finish_reason,
                        "logprobs": _logprobs(g)})
    return {"id": cid, "object": "chat.completion", "created": created, "model": body.model, "choices": choices,
            "usage": _usage(gens)}


async def _sse_chat(job, body: ChatCompletionBody, cid: str, created: int, plan):
    """OpenAI's chunk stream: each choice's deltas carry its index (text as content, calls as tool_calls
    deltas); with ``stream_options.include_usage`` a last chunk with no choices carries the usage. A client
    that leaves cancels the generation."""
    from tunesmith.serve.tools import ChoiceDeltas

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        doc = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model, "choices": choices}
        if usage:
            doc["usage"] = usage
        return f"data: {json.dumps(doc, ensure_ascii=False)}\n\n"

    def choice(i: int, delta: dict, finish: str | None = None) -> dict:
        return {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}

    readers = [ChoiceDeltas(plan) for _ in range(body.n)]
    try:
        yield chunk([choice(i, {"role": "assistant", "content": ""}) for i in range(body.n)])
        gens: list[Generation] = []
        async for i, item in job.events():
            if isinstance(item, Generation):
                gens.append(item)
                for delta in readers[i].close():
                    yield chunk([choice(i, delta)])
                yield chunk([choice(i, {}, readers[i].finish_reason(item.finish_reason))])
            elif item:
                for delta in readers[i].feed(item):
                    yield chunk([choice(i, delta)])
        if body.include_usage:
            yield chunk([], _usage(gens))
        yield "data: [DONE]\n\n"
    except APIError as exc:  # e.g. the server is shutting down mid-stream
        yield f"data: {json.dumps({'error': exc.body})}\n\n"
    finally:
        job.cancel()


@router.post("/completions")
async def completions(body: CompletionBody, request: Request, key: Key):
    engine = _engine(request, body.model, key)
    if body.stream:
        raise APIError(400, "stream is supported on /v1/chat/completions only", param="stream")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    _check_prompt_size(engine, prompts)
    encoded = [engine.text_prompt_ids(p) for p in prompts]
    budgets = [_token_budget(request, engine, len(ids), body.max_tokens, 16) for ids in encoded]
    jobs = [engine.submit(body.model, ids, _params(body, b)) for ids, b in zip(encoded, budgets, strict=True)]
    gens = [g for per_prompt in await _results(request, jobs) for g in per_prompt]
    usage = {"prompt_tokens": sum(g.prompt_tokens for g in gens[:: body.n]),
             "completion_tokens": sum(g.completion_tokens for g in gens)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
        "model": body.model,
        "choices": [{"index": i, "text": g.text, "finish_reason": g.finish_reason, "logprobs": None}
                    for i, g in enumerate(gens)],
        "usage": usage,
    }
