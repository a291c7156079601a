"""``/v1/responses``: OpenAI's Responses API over the same engine and request plan as chat completions.

The input is a string or a list of items: messages (``role`` + text ``content`` or content parts of type
``input_text``/``output_text``), the model's ``function_call`` items and the caller's ``function_call_output``
items; ``instructions`` becomes the system message. A request becomes a chat body and goes through
:func:`tunesmith.serve.plan.requests.response_plan`: function ``tools`` and ``tool_choice`` as in chat, ``text.format``
as the output constraint. Answers carry an assistant message (its ``output_text``) and/or ``function_call`` items;
a reply cut by ``max_output_tokens`` is ``incomplete``. With ``store`` (the default) a response is kept per key,
so that ``previous_response_id`` continues its conversation (its instructions are not carried over, as at
OpenAI; a key keeps at most ``--quota responses``); ``GET`` and ``DELETE /v1/responses/{id}`` read and remove one.
Its ``metadata`` follows OpenAI's rule (16 pairs, keys up to 64 characters, values up to 512). What is kept or
read runs in the store lane (:mod:`tunesmith.serve.api.store_lane`), never on the event loop. Streaming sends
OpenAI's events (created, in_progress, output_item.added, content_part.added, output_text.delta…,
output_text.done, content_part.done, output_item.done; function_call_arguments.delta/done for calls;
completed/incomplete).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import APIRouter, Request, Response

from tunesmith.serve.api.auth import Key, engine_for
from tunesmith.serve.api.json_body import OffLoopJSON
from tunesmith.serve.api.routes_openai import _results, obfuscated, planned_run, streamed
from tunesmith.serve.api.store_lane import in_store_lane, stored
from tunesmith.serve.engines.interface import Generation
from tunesmith.serve.errors import APIError, found
from tunesmith.serve.plan.fields import RESPONSES, check_fields
from tunesmith.serve.plan.requests import response_plan
from tunesmith.serve.plan.schemas import ResponseBody
from tunesmith.serve.store.quotas import check_metadata, check_response

router = APIRouter(prefix="/v1", route_class=OffLoopJSON)


def earlier_turns(body: ResponseBody, request: Request, key: str | None) -> list[dict]:
    """The stored turns of ``previous_response_id`` (this key's own), once the key has room to keep this response
    (checked before the answer is paid for); none without one."""
    if body.store is not False:
        check_response(request, key)
    if not body.previous_response_id:
        return []
    kept = found(request.app.state.store.get_response(body.previous_response_id, key), "response",
                 body.previous_response_id, "previous_response_id")
    return kept[1]


def output_items(plan, body: ResponseBody, rid: str, gen: Generation) -> tuple[list[dict], dict]:
    """The answer as Responses output items (a message and/or function calls), and as the chat message kept."""
    msg, called = plan.message(gen.text)
    calls = (msg.get("tool_calls") or [])[: body.max_tool_calls or None]
    items = []
    if msg.get("content") or not calls:
        items.append(message_item(rid, msg.get("content") or "", _status(gen), gen.logprobs))
    cut = msg["tool_calls"][-1] if calls and not called else None  # the answer ended inside this call
    items += [call_item(c["id"], c["function"]["name"], c["function"]["arguments"],
                        "incomplete" if c is cut else "completed") for c in calls]
    kept = {"role": "assistant", "content": msg.get("content")} | ({"tool_calls": calls} if calls else {})
    return items, kept


def message_item(rid: str, text: str, status: str, logprobs: list | None = None) -> dict:
    return {"type": "message", "id": f"msg_{rid[5:]}", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}]}


def call_item(call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"type": "function_call", "id": f"fc_{call_id[5:]}", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def response_object(body: ResponseBody, rid: str, created: int, status: str, output: list[dict] | None = None,
                    gen: Generation | None = None) -> dict:
    """OpenAI's Response with its output items once there are some."""
    usage = None if gen is None else {
        "input_tokens": gen.prompt_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": gen.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": gen.prompt_tokens + gen.completion_tokens}
    return {"id": rid, "object": "response", "created_at": created, "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "metadata": body.metadata or {}, "model": body.model,
            "output": output or [], "parallel_tool_calls": body.parallel_tool_calls is not False,
            "temperature": body.temperature if body.temperature is not None else 1.0,
            "tool_choice": body.tool_choice or "auto", "tools": body.tools or [],
            "top_p": body.top_p if body.top_p is not None else 1.0, "max_output_tokens": body.max_output_tokens,
            "max_tool_calls": body.max_tool_calls, "previous_response_id": body.previous_response_id,
            "store": body.store is not False, "text": {"format": (body.text or {}).get("format") or {"type": "text"}},
            "top_logprobs": body.top_logprobs, "truncation": "disabled", "usage": usage,
            "completed_at": int(time.time()) if status != "in_progress" else None}


@router.post("/responses")
async def create_response(body: ResponseBody, request: Request, response: Response, key: Key):
    check_fields(RESPONSES, body)
    check_metadata(body.metadata, "metadata")
    engine = await engine_for(request, body.model, key)
    if body.model in engine.heads:
        raise APIError(400, f"model '{body.model}' is a trained head: ask it through /v1/chat/completions",
                       param="model", code="unsupported_model")
    turns = []
    if body.store is not False or body.previous_response_id:
        turns = await stored(request, key, earlier_turns, body, request, key)
    plan, [job], ticket = await planned_run(request, key, engine, response_plan, body, turns)
    rid, created = f"resp_{uuid.uuid4().hex}", int(time.time())

    async def finish(gen: Generation, items: list[dict], kept: dict) -> dict:
        doc = response_object(body, rid, created, _status(gen), items, gen)
        if body.store is not False:  # the answer is paid for: kept even when the key's line is full or the client left
            await asyncio.shield(stored(request, key, request.app.state.store.add_response, key, doc,
                                        [*plan.conversation, kept], always=True))
        return doc

    if plan.stream:
        return streamed(_events(job, plan, body, rid, created, finish), ticket, plan)
    response.headers.update(plan.headers() | ticket.headers)
    try:
        [[gen]] = await _results(request, [job])
    finally:
        ticket.release()
    return await finish(gen, *output_items(plan, body, rid, gen))


@router.get("/responses/{rid}")
@in_store_lane
def retrieve_response(rid: str, request: Request, key: Key):
    return found(request.app.state.store.get_response(rid, key), "response", rid, "response_id")[0]


@router.delete("/responses/{rid}")
@in_store_lane
def delete_response(rid: str, request: Request, key: Key):
    found(request.app.state.store.delete_response(rid, key) or None, "response", rid, "response_id")
    return {"id": rid, "object": "response.deleted", "deleted": True}


def _status(gen: Generation) -> str:
    return "incomplete" if gen.finish_reason == "length" else "completed"


async def _events(job, plan, body: ResponseBody, rid: str, created: int, finish):
    """OpenAI's Responses event stream; a client that leaves cancels the generation."""
    seq = iter(range(1_000_000))
    reader, opened = plan.reader(), []  # the output items opened so far: ("message"|call id, index)

    def event(kind: str, **fields) -> str:
        doc = {"type": kind, "sequence_number": next(seq), **fields}
        if kind.endswith(".delta"):
            doc = obfuscated(doc, plan)
        return f"event: {kind}\ndata: {json.dumps(doc, ensure_ascii=False)}\n\n"

    def text_where() -> dict:
        return {"item_id": f"msg_{rid[5:]}", "output_index": 0, "content_index": 0}

    def open_message():
        opened.append(["message", len(opened), ""])
        yield event("response.output_item.added", output_index=0, item=message_item(rid, "", "in_progress") | {"content": []})
        yield event("response.content_part.added", **text_where(), part={"type": "output_text", "text": "",
                                                                         "annotations": [], "logprobs": []})

    def on_delta(delta: dict, logprobs):
        if "content" in delta:
            if not opened:
                yield from open_message()
            if opened[-1][0] == "message":
                opened[-1][2] += delta["content"]
                yield event("response.output_text.delta", **text_where(), delta=delta["content"], logprobs=logprobs or [])
        for call in delta.get("tool_calls", []):
            if call.get("id"):
                if body.max_tool_calls is not None and sum(o[0] != "message" for o in opened) >= body.max_tool_calls:
                    opened.append(["dropped", len(opened), ""])
                    continue
                opened.append([call["id"], len(opened), ""])
                yield event("response.output_item.added", output_index=opened[-1][1],
                            item=call_item(call["id"], call["function"]["name"], "", "in_progress"))
            elif opened and opened[-1][0] not in ("message", "dropped"):
                opened[-1][2] += call["function"]["arguments"]
                yield event("response.function_call_arguments.delta", item_id=f"fc_{opened[-1][0][5:]}",
                            output_index=opened[-1][1], delta=call["function"]["arguments"])

    try:
        yield event("response.created", response=response_object(body, rid, created, "in_progress"))
        yield event("response.in_progress", response=response_object(body, rid, created, "in_progress"))
        if not plan.tools.parse:
            for e in open_message():
                yield e
        async for _, item in job.events():
            if isinstance(item, Generation):
                for d in reader.close():
                    for e in on_delta(d, None):
                        yield e
                items, kept = output_items(plan, body, rid, item)
                same_call_ids(opened, items, kept)
                if not opened and items[0]["type"] == "message":  # tools were offered and none was called
                    for e in open_message():
                        yield e
                for e in _closing_events(event, opened, items, text_where(), item):
                    yield e
                status = _status(item)
                yield event(f"response.{status}", response=await finish(item, items, kept))
            else:
                for i, d in enumerate(reader.feed(item.text)):
                    for e in on_delta(d, item.logprobs if i == 0 else None):
                        yield e
    except APIError as exc:  # e.g. the server is shutting down mid-stream
        yield event("error", code=exc.body["code"], message=exc.body["message"], param=exc.body["param"])
    finally:
        job.cancel()


def same_call_ids(opened: list, items: list[dict], kept: dict) -> None:
    """The final items (read again from the whole text) with the call ids the stream already announced."""
    streamed = [kind for kind, _, _ in opened if kind not in ("message", "dropped")]
    calls = [i for i in items if i["type"] == "function_call"]
    for call_id, item, call in zip(streamed, calls, kept.get("tool_calls", []), strict=False):
        item["call_id"], item["id"], call["id"] = call_id, f"fc_{call_id[5:]}", call_id


def _closing_events(event, opened: list, items: list[dict], where: dict, gen: Generation):
    """The done events of every output item opened while streaming, in order, with their final content."""
    by_id = {i.get("call_id", "message"): i for i in items}
    for kind, index, _ in opened:
        if kind == "dropped":
            continue
        item = by_id.get(kind)
        if kind == "message":
            part = item["content"][0]
            yield event("response.output_text.done", **where, text=part["text"], logprobs=part["logprobs"])
            yield event("response.content_part.done", **where, part=part)
        else:
            yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                        name=item["name"], arguments=item["arguments"])
        yield event("response.output_item.done", output_index=index, item=item)
