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


def _engine(request: Request, model: str):
    request.app.state.sync_adapters()
    engine = request.app.state.engine
    if model not in engine.model_ids():
        raise APIError(404, f"The model '{model}' does not exist. Available: {', '.join(engine.model_ids())}",
                       param="model", code="model_not_found")
    return engine


def _params(body: SamplingBody, max_tokens: int | None, i: int = 0) -> GenParams:
    seed = None if body.seed is None else body.seed + i
    return GenParams(max_tokens or 256, body.temperature, body.top_p, body.stops(), seed)


def _usage(gens: list[Generation]) -> dict:
    prompt = gens[0].prompt_tokens if gens else 0
    completion = sum(g.completion_tokens for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@router.get("/models")
async def list_models(request: Request, _key: Key):
    request.app.state.sync_adapters()
    created = int(time.time())
    return {"object": "list", "data": [
        {"id": m, "object": "model", "created": created, "owned_by": "tunesmith"}
        for m in request.app.state.engine.model_ids()]}


async def _generate(engine, model: str, ids: list[int], body: SamplingBody, max_tokens: int | None) -> list[Generation]:
    futures = [engine.submit(model, ids, _params(body, max_tokens, i)) for i in range(body.n)]
    return [await asyncio.wrap_future(f) for f in futures]


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionBody, request: Request, _key: Key):
    engine = _engine(request, body.model)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    ids = engine.chat_prompt_ids(messages)
    max_tokens = body.max_completion_tokens or body.max_tokens
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if body.stream:
        return StreamingResponse(_sse_chat(engine, body, ids, max_tokens, cid, created), media_type="text/event-stream")
    gens = await _generate(engine, body.model, ids, body, max_tokens)
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": body.model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": g.text}, "finish_reason": g.finish_reason,
                     "logprobs": None} for i, g in enumerate(gens)],
        "usage": _usage(gens),
    }


def _sse_chat(engine, body: ChatCompletionBody, ids, max_tokens, cid: str, created: int):
    """OpenAI's chunk stream: each choice's deltas carry its index; with ``stream_options.include_usage``
    a last chunk with no choices carries the usage."""
    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        doc = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model, "choices": choices}
        if usage:
            doc["usage"] = usage
        return f"data: {json.dumps(doc, ensure_ascii=False)}\n\n"

    def choice(i: int, delta: dict, finish: str | None = None) -> dict:
        return {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}

    yield chunk([choice(i, {"role": "assistant", "content": ""}) for i in range(body.n)])
    gens: list[Generation] = []
    for i, item in engine.stream(body.model, ids, [_params(body, max_tokens, k) for k in range(body.n)]):
        if isinstance(item, Generation):
            gens.append(item)
            yield chunk([choice(i, {}, item.finish_reason)])
        elif item:
            yield chunk([choice(i, {"content": item})])
    if body.include_usage:
        yield chunk([], _usage(gens))
    yield "data: [DONE]\n\n"


@router.post("/completions")
async def completions(body: CompletionBody, request: Request, _key: Key):
    engine = _engine(request, body.model)
    if body.stream:
        raise APIError(400, "stream is supported on /v1/chat/completions only", param="stream")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    gens: list[Generation] = []
    for p in prompts:
        gens += await _generate(engine, body.model, engine.text_prompt_ids(p), body, body.max_tokens or 16)
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
