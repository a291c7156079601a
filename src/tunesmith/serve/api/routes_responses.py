"""``/v1/responses``: OpenAI's Responses API over the same engine and request plan as chat completions.

The input is a string or a list of items: messages (``role`` + text ``content`` or content parts of type
``input_text``/``output_text``), the model's ``function_call`` items and the caller's ``function_call_output``
items; ``instructions`` becomes the system message. A request becomes a chat body and goes through
:func:`tunesmith.serve.plan.requests.chat_plan`: function ``tools`` and ``tool_choice`` as in chat, ``text.format``
as the output constraint. Answers carry an assistant message (its ``output_text``) and/or ``function_call`` items;
a reply cut by ``max_output_tokens`` is ``incomplete``. With ``store`` (the default) a response is kept per key,
so that ``previous_response_id`` continues its conversation (its instructions are not carried over, as at
OpenAI); ``GET`` and ``DELETE /v1/responses/{id}`` read and remove one. Streaming sends OpenAI's events
(created, in_progress, output_item.added, content_part.added, output_text.delta…, output_text.done,
content_part.done, output_item.done; function_call_arguments.delta/done for calls; completed/incomplete).
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tunesmith.serve.api.routes_openai import Key, _engine, _results, obfuscated
from tunesmith.serve.engines.builtin import Generation
from tunesmith.serve.engines.errors import APIError, found
from tunesmith.serve.plan.fields import RESPONSES, check_fields
from tunesmith.serve.plan.requests import with_constraint
from tunesmith.serve.plan.schemas import ChatCompletionBody

router = APIRouter(prefix="/v1")
ROLES = {"user", "assistant", "system", "developer"}
TEXT_PARTS = {"input_text", "output_text", "text"}
LOGPROBS = "message.output_text.logprobs"


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


def part_text(part, where: str) -> str:
    if isinstance(part, str):
        return part
    if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS or not isinstance(part.get("text"), str):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        raise APIError(400, f"{where}: content part of type '{kind}' is not supported; send text parts "
                       "({'type': 'input_text', 'text': ...})", param=where, code="unsupported_content")
    return part["text"]


def input_messages(items: str | list[dict]) -> list[dict]:
    """``input`` as chat messages: messages (developer → system), consecutive ``function_call`` items as one
    assistant message with tool_calls, ``function_call_output`` items as tool messages."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict] = []
    for i, item in enumerate(items):
        where, kind = f"input[{i}]", item.get("type", "message")
        if kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else "".join(part_text(p, f"{where}.output") for p in output or [])
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
        elif kind == "message" and item.get("role") in ROLES:
            content = item.get("content")
            if isinstance(content, list):
                text = "".join(part_text(p, f"{where}.content[{j}]") for j, p in enumerate(content))
            else:
                text = part_text(content, f"{where}.content")
            messages.append({"role": "system" if item["role"] == "developer" else item["role"], "content": text})
        else:
            raise APIError(400, f"{where}: only messages with role {', '.join(sorted(ROLES))}, function_call and "
                           f"function_call_output items are supported, got type '{kind}' role '{item.get('role')}'",
                           param=where, code="unsupported_input")
    if not messages:
        raise APIError(400, "input: give at least one message", param="input", code="empty_input")
    return messages


def chat_tools(body: ResponseBody) -> tuple[list[dict] | None, str | dict | None]:
    """Responses' function tools and tool_choice in chat's shape; any other tool type is a 400 on ``tools``."""
    tools = []
    for i, t in enumerate(body.tools or []):
        if t.get("type") != "function":
            raise APIError(400, f"tools[{i}]: tools of type '{t.get('type')}' are not served here; send function "
                           "tools", param="tools", code="unsupported_parameter")
        tools.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters", "strict")
                                                       if k in t}})
    choice = body.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise APIError(400, "tool_choice: only 'none', 'auto', 'required' or a function are served",
                           param="tool_choice", code="invalid_value")
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    return tools or None, choice


def conversation(body: ResponseBody, request: Request, key: str | None) -> list[dict]:
    """The stored turns of ``previous_response_id`` (this key's own) followed by this request's input."""
    earlier: list[dict] = []
    if body.previous_response_id:
        kept = found(request.app.state.store.get_response(body.previous_response_id, key), "response",
                     body.previous_response_id, "previous_response_id")
        earlier = kept[1]
    return [*earlier, *input_messages(body.input)]


def response_plan(body: ResponseBody, request: Request, engine, turns: list[dict]):
    """The request plan of a Responses request: its conversation, tools and text.format as a chat body."""
    from tunesmith.serve.plan.requests import chat_plan, output_format, stream_flags

    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    tools, choice = chat_tools(body)
    fmt = (body.text or {}).get("format")
    logprobs = LOGPROBS in (body.include or []) or body.top_logprobs is not None
    chat = ChatCompletionBody(model=body.model, messages=[*system, *turns], tools=tools, tool_choice=choice,
                              parallel_tool_calls=body.parallel_tool_calls, stream=body.stream,
                              temperature=body.temperature, top_p=body.top_p,
                              max_tokens=body.max_output_tokens or None, logprobs=logprobs,
                              top_logprobs=body.top_logprobs if logprobs else None)
    if body.text and set(body.text) - {"format", "verbosity"}:
        raise APIError(400, f"Unrecognized argument supplied in text: {sorted(set(body.text) - {'format', 'verbosity'})[0]}",
                       param="text", code="unrecognized_argument")
    if (body.text or {}).get("verbosity") not in (None, "medium"):
        raise APIError(400, "text.verbosity: the answer's length follows max_output_tokens; send null or 'medium'",
                       param="text.verbosity", code="unsupported_parameter")
    plan = chat_plan(chat, engine, request.app.state.settings.max_tokens, output_format(fmt, "text.format"), "input")
    plan.include_usage, plan.obfuscation = False, stream_flags(body, ("include_obfuscation",))[1]
    return plan


def output_items(plan, body: ResponseBody, rid: str, gen: Generation) -> tuple[list[dict], dict]:
    """The answer as Responses output items (a message and/or function calls), and as the chat message kept."""
    from tunesmith.serve.plan import tools

    msg, called = tools.message(plan.tools, gen.text)
    calls = (msg.get("tool_calls") or [])[: body.max_tool_calls or None]
    items = []
    if msg.get("content") or not calls:
        items.append(message_item(rid, msg.get("content") or "", _status(gen), gen.logprobs))
    items += [call_item(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls]
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
async def create_response(body: ResponseBody, request: Request, key: Key):
    check_fields(RESPONSES, body)
    engine = _engine(request, body.model, key)
    if body.model in engine.heads:
        raise APIError(400, f"model '{body.model}' is a trained head: ask it through /v1/chat/completions",
                       param="model", code="unsupported_model")
    turns = conversation(body, request, key)
    plan = await with_constraint(engine, response_plan(body, request, engine, turns))
    [job] = engine.run(plan)
    rid, created = f"resp_{uuid.uuid4().hex}", int(time.time())

    def finish(gen: Generation, items: list[dict], kept: dict) -> dict:
        doc = response_object(body, rid, created, _status(gen), items, gen)
        if body.store is not False:
            request.app.state.store.add_response(key, doc, [*turns, kept])
        return doc

    if plan.stream:
        return StreamingResponse(_events(job, plan, body, rid, created, finish), media_type="text/event-stream")
    [[gen]] = await _results(request, [job])
    return finish(gen, *output_items(plan, body, rid, gen))


@router.get("/responses/{rid}")
async def retrieve_response(rid: str, request: Request, key: Key):
    return found(request.app.state.store.get_response(rid, key), "response", rid, "response_id")[0]


@router.delete("/responses/{rid}")
async def delete_response(rid: str, request: Request, key: Key):
    found(request.app.state.store.delete_response(rid, key) or None, "response", rid, "response_id")
    return {"id": rid, "object": "response.deleted", "deleted": True}


def _status(gen: Generation) -> str:
    return "incomplete" if gen.finish_reason == "length" else "completed"


async def _events(job, plan, body: ResponseBody, rid: str, created: int, finish):
    """OpenAI's Responses event stream; a client that leaves cancels the generation."""
    from tunesmith.serve.plan.tools import ChoiceDeltas

    seq = iter(range(1_000_000))
    reader, opened = ChoiceDeltas(plan.tools), []  # the output items opened so far: ("message"|call id, index)

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
                yield event(f"response.{status}", response=finish(item, items, kept))
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
