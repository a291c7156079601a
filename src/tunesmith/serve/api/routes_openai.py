"""OpenAI-compatible inference routes: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from tunesmith.serve.api.auth import Key, engine_for, visible_models
from tunesmith.serve.api.json_body import OffLoopJSON
from tunesmith.serve.api.store_lane import stored
from tunesmith.serve.api.stored_completions import before_storing
from tunesmith.serve.engines.interface import Generation
from tunesmith.serve.errors import APIError
from tunesmith.serve.plan.fields import CHAT, COMPLETIONS, check_fields
from tunesmith.serve.plan.requests import build, chat_plan, completion_plan
from tunesmith.serve.plan.schemas import ChatCompletionBody, CompletionBody

router = APIRouter(prefix="/v1", route_class=OffLoopJSON)


def _logprobs(gen: Generation) -> dict | None:
    """A choice's ``logprobs`` (``content``: one entry per generated token) where the engine reports them."""
    return None if gen.logprobs is None else {"content": gen.logprobs, "refusal": None}


def _usage(gens: list[Generation], prompts: int = 1) -> dict:
    """Usage of a request: each prompt counted once (its ``n`` choices share it), every choice's tokens."""
    per_choice = len(gens) // max(prompts, 1)
    prompt = sum(g.prompt_tokens for g in gens[::per_choice]) if gens else 0
    completion = sum(g.completion_tokens for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def obfuscated(doc: dict, plan) -> dict:
    """``stream_options.include_obfuscation``: random padding on each event, so its size tells nothing."""
    if plan.obfuscation:
        doc["obfuscation"] = secrets.token_urlsafe(secrets.randbelow(16) + 1)
    return doc


@router.get("/models")
async def list_models(request: Request, key: Key):
    """Each model in OpenAI's shape; an adapter names the model it was fine-tuned from as ``parent`` (the base model,
    or the fine-tune a continued job started from) and the base as ``root``, as vLLM does, which tells an
    evaluator that it serves a fine-tune, to be asked as it was trained. A trained head also names its
    kind (``head``: classifier, regression or span; a tunesmith extension), so the dashboard knows which
    models have label probabilities to show."""
    created = int(time.time())
    engine = request.app.state.engine
    base = engine.model_ids()[0]

    models = request.app.state.models

    def entries() -> list[dict]:  # the key's fine-tunes from the store: off the event loop
        out = []
        for m in visible_models(request, key):
            doc = {"id": m, "object": "model", "created": created, "owned_by": "tunesmith",
                   "parent": None if m == base else models.parents.get(m, base), "root": base}
            out.append((doc | {"head": kind}) if (kind := models.head_kind(m)) else doc)
        return out

    return {"object": "list", "data": await stored(request, key, entries)}


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
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: no "never retrieved" log


async def planned_run(request: Request, key: str | None, engine, builder, body, *more):
    """The request's plan, built off the event loop, running on the engine as ``key``'s: a place among the key's
    requests in flight first (429 past its limit), its tokens charged once planned. Returns (plan, the engine's
    requests, the ticket to release when the answer has been sent)."""
    batch = request.scope.get("tunesmith.batch")  # a batch's line (tunesmith.serve.batches.runner): in its key's share
    ticket = await request.app.state.limiter.admitted(key, counted=batch is None)
    try:
        plan = await build(builder, body, *more, engine, request.app.state.settings.max_tokens,
                           lane=request.app.state.lanes.plan, key=key)
        await ticket.charged(plan.cost)
        return plan, engine.run(plan, tenant=key, background=batch is not None), ticket
    except BaseException:
        ticket.release()
        raise


def streamed(events, ticket, plan) -> StreamingResponse:
    """An event stream whose key's place is let go when it ends, however it ends."""
    async def released():
        try:
            async for event in events:
                yield event
        finally:
            ticket.release()

    return StreamingResponse(released(), media_type="text/event-stream", headers=plan.headers() | ticket.headers)


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionBody, request: Request, response: Response, key: Key):
    check_fields(CHAT, body)
    engine = await engine_for(request, body.model, key)
    if body.model in engine.heads:
        return await _head_reply(request, key, engine, body)
    if body.store:  # its metadata and the key's quota, before the answer is paid for (in the store lane)
        await stored(request, key, before_storing, request, key, body)
    plan, [job], ticket = await planned_run(request, key, engine, chat_plan, body)
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    async def answered(gens: list[Generation]) -> dict:
        """The ChatCompletion of these generations, kept (in the store lane) when the request asked to store it."""
        doc = chat_object(plan, gens, cid, created, body.model)
        if body.store:  # the answer is paid for: kept even when the key's line is full or the client has left
            from tunesmith.serve.api.stored_completions import store_completion

            await asyncio.shield(stored(request, key, store_completion, request, key, doc, body, plan, always=True))
        return doc | ({"metadata": body.metadata} if body.store and body.metadata else {})

    if plan.stream:
        return streamed(_sse_chat(job, plan, cid, created, answered), ticket, plan)
    response.headers.update(plan.headers() | ticket.headers)
    try:
        [gens] = await _results(request, [job])
    finally:
        ticket.release()
    return await answered(gens)


def chat_object(plan, gens: list[Generation], cid: str, created: int, model: str) -> dict:
    """OpenAI's ChatCompletion: each choice's message read through the plan (content or tool calls)."""
    choices = []
    for i, g in enumerate(gens):
        msg, called = plan.message(g.text)
        choices.append({"index": i, "message": msg | {"refusal": None},
                        "finish_reason": "tool_calls" if called else g.finish_reason, "logprobs": _logprobs(g)})
    return {"id": cid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": _usage(gens)}


async def _head_reply(request: Request, key, engine, body: ChatCompletionBody):
    """A trained head answers its label (or number, or span): constraints and tools are not its to follow."""
    from tunesmith.serve.engines.heads import chat_reply

    for param in ("response_format", "tools"):
        if getattr(body, param):
            raise APIError(400, f"model '{body.model}' is a trained head that answers its label; '{param}' is not "
                           "served for it", param=param, code="unsupported_parameter")
    plain = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    return await chat_reply(engine.heads[body.model], body, plain, request.app.state.lanes.heads, key)


async def _sse_chat(job, plan, cid: str, created: int, answered=None):
    """OpenAI's chunk stream: each choice's deltas carry its index (text as content, calls as tool_calls
    deltas) and the logprobs of the tokens they carry; with ``stream_options.include_usage`` a last chunk with no
    choices carries the usage. A client that leaves cancels the generation. ``answered(gens)``: called with every
    choice's generation once all have ended (awaited: a stored completion is kept there)."""
    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        doc = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": plan.model,
               "choices": choices}
        if usage:
            doc["usage"] = usage
        return f"data: {json.dumps(obfuscated(doc, plan) if choices else doc, ensure_ascii=False)}\n\n"

    def choice(i: int, delta: dict, finish: str | None = None, logprobs: list | None = None) -> dict:
        return {"index": i, "delta": delta, "finish_reason": finish,
                "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None}}

    readers = [plan.reader() for _ in range(plan.n)]
    pending: list[list | None] = [None] * plan.n  # logprobs of tokens whose text has not made a delta yet

    def emit(i: int, deltas: list[dict], logprobs: list | None):
        if logprobs is not None:
            pending[i] = (pending[i] or []) + logprobs
        for d in deltas:
            yield chunk([choice(i, d, logprobs=pending[i])])
            pending[i] = None

    try:
        yield chunk([choice(i, {"role": "assistant", "content": ""}) for i in range(plan.n)])
        gens: list[Generation] = []
        by_choice: dict[int, Generation] = {}
        async for i, item in job.events():
            if isinstance(item, Generation):
                gens.append(item)
                by_choice[i] = item
                for c in emit(i, readers[i].close(), None):
                    yield c
                yield chunk([choice(i, {}, readers[i].finish_reason(item.finish_reason), pending[i])])
            else:
                for c in emit(i, readers[i].feed(item.text), item.logprobs):
                    yield c
        if answered is not None:
            await answered([by_choice[i] for i in range(plan.n)])
        if plan.include_usage:
            yield chunk([], _usage(gens))
        yield "data: [DONE]\n\n"
    except APIError as exc:  # e.g. the server is shutting down mid-stream
        yield f"data: {json.dumps({'error': exc.body})}\n\n"
    finally:
        job.cancel()


@router.post("/completions")
async def completions(body: CompletionBody, request: Request, response: Response, key: Key):
    check_fields(COMPLETIONS, body)
    engine = await engine_for(request, body.model, key)
    plan, jobs, ticket = await planned_run(request, key, engine, completion_plan, body)
    cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if plan.stream:
        return streamed(_sse_completions(jobs, plan, cid, created), ticket, plan)
    response.headers.update(ticket.headers)
    try:
        gens = [g for per_prompt in await _results(request, jobs) for g in per_prompt]
    finally:
        ticket.release()
    choices = [plan.completion_choice(i, g) for i, g in enumerate(gens)]
    return {"id": cid, "object": "text_completion", "created": created, "model": body.model, "choices": choices,
            "usage": _usage(gens, len(plan.prompts))}


async def _sse_completions(jobs, plan, cid: str, created: int):
    """The text_completion chunk stream: choice ``prompt index * n + i``; with include_usage a last chunk with
    the usage; the echoed prompt first when asked."""
    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        doc = {"id": cid, "object": "text_completion", "created": created, "model": plan.model, "choices": choices}
        if usage:
            doc["usage"] = usage
        return f"data: {json.dumps(obfuscated(doc, plan) if choices else doc, ensure_ascii=False)}\n\n"

    def choice(i: int, text: str, logprobs=None, finish: str | None = None) -> dict:
        return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}

    offsets = [len(plan.texts[i // plan.n]) if plan.echo else 0 for i in range(len(jobs) * plan.n)]
    try:
        if plan.echo:
            for i in range(len(offsets)):
                yield chunk([choice(i, plan.texts[i // plan.n])])
        gens: list[Generation] = []
        async for i, item in merged_events(jobs, plan.n):
            if isinstance(item, Generation):
                gens.append(item)
                end = plan.completion_logprobs([item.end], offsets[i]) if item.end else None
                yield chunk([choice(i, "", end, item.finish_reason)])
            else:
                yield chunk([choice(i, item.text, plan.completion_logprobs(item.logprobs, offsets[i]))])
                offsets[i] += len(item.text)
        if plan.include_usage:
            yield chunk([], _usage(gens, len(jobs)))
        yield "data: [DONE]\n\n"
    except APIError as exc:
        yield f"data: {json.dumps({'error': exc.body})}\n\n"
    finally:
        for job in jobs:
            job.cancel()


async def merged_events(jobs, n: int):
    """The events of several requests as they come, each choice numbered ``request index * n + choice``."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, job):
        try:
            async for i, item in job.events():
                await queue.put((k * n + i, item))
        except BaseException as exc:  # noqa: BLE001 - handed to the reader
            await queue.put((None, exc))
        await queue.put((None, None))

    tasks = [asyncio.ensure_future(pump(k, j)) for k, j in enumerate(jobs)]
    try:
        done = 0
        while done < len(jobs):
            i, item = await queue.get()
            if i is None:
                if isinstance(item, BaseException):
                    raise item
                done += 1
                continue
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
