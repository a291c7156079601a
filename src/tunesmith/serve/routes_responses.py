"""``/v1/responses``: OpenAI's Responses API for text, over the same engine as chat completions.

The input is a string or a list of messages (``role`` + text ``content``, or content parts of type
``input_text``/``output_text``); ``instructions`` becomes the system message. Answers carry one assistant
message whose ``output_text`` the client reads; a reply cut by ``max_output_tokens`` is ``incomplete``.
Streaming sends OpenAI's event sequence (created, in_progress, output_item.added, content_part.added,
output_text.delta..., output_text.done, content_part.done, output_item.done, completed/incomplete).
Nothing is stored: ``previous_response_id``, ``conversation`` and tools are refused with a 400 naming them.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tunesmith.serve.engine import Generation, GenParams
from tunesmith.serve.errors import APIError
from tunesmith.serve.routes_openai import Key, _check_prompt_size, _engine, _results, _token_budget

router = APIRouter(prefix="/v1")
ROLES = {"user", "assistant", "system", "developer"}
TEXT_PARTS = {"input_text", "output_text", "text"}
DEFAULT_MAX_OUTPUT = 256


class ResponseBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # accept (and ignore) fields that change nothing here
    model: str
    input: str | list[dict]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    metadata: dict[str, str] | None = Field(None, max_length=16)
    tools: list[dict] | None = None
    previous_response_id: str | None = None
    conversation: str | dict | None = None


def refuse_unsupported(body: ResponseBody) -> None:
    if body.previous_response_id:
        raise APIError(400, "previous_response_id is not supported: this server stores no responses; send the "
                       "earlier turns in 'input' as messages", param="previous_response_id", code="unsupported_parameter")
    if body.conversation:
        raise APIError(400, "conversation is not supported: send the turns in 'input' as messages",
                       param="conversation", code="unsupported_parameter")
    if body.tools:
        raise APIError(400, "tools are not supported on /v1/responses here; use /v1/chat/completions with tools",
                       param="tools", code="unsupported_parameter")


def part_text(part, where: str) -> str:
    if isinstance(part, str):
        return part
    if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS or not isinstance(part.get("text"), str):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        raise APIError(400, f"{where}: content part of type '{kind}' is not supported; send text parts "
                       "({'type': 'input_text', 'text': ...})", param=where, code="unsupported_content")
    return part["text"]


def to_messages(body: ResponseBody) -> list[dict]:
    """``instructions`` + ``input`` as chat messages (developer → system, as in chat completions)."""
    messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if isinstance(body.input, str):
        return [*messages, {"role": "user", "content": body.input}]
    for i, item in enumerate(body.input):
        where = f"input[{i}]"
        if item.get("type", "message") != "message" or item.get("role") not in ROLES:
            raise APIError(400, f"{where}: only messages with role {', '.join(sorted(ROLES))} are supported, got "
                           f"type '{item.get('type', 'message')}' role '{item.get('role')}'", param=where,
                           code="unsupported_input")
        content = item.get("content")
        if isinstance(content, list):
            text = "".join(part_text(p, f"{where}.content[{j}]") for j, p in enumerate(content))
        else:
            text = part_text(content, f"{where}.content")
        messages.append({"role": "system" if item["role"] == "developer" else item["role"], "content": text})
    if not messages:
        raise APIError(400, "input: give at least one message", param="input", code="empty_input")
    return messages


def response_object(body: ResponseBody, rid: str, created: int, status: str, text: str | None = None,
                    gen: Generation | None = None) -> dict:
    """OpenAI's Response: one assistant message with its output_text once there is one."""
    output = [] if text is None else [message_item(rid, text, "completed" if status == "completed" else "incomplete")]
    usage = None if gen is None else {
        "input_tokens": gen.prompt_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": gen.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": gen.prompt_tokens + gen.completion_tokens}
    return {"id": rid, "object": "response", "created_at": created, "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "metadata": body.metadata or {}, "model": body.model, "output": output,
            "parallel_tool_calls": True, "temperature": body.temperature if body.temperature is not None else 1.0,
            "tool_choice": "auto", "tools": [], "top_p": body.top_p if body.top_p is not None else 1.0,
            "max_output_tokens": body.max_output_tokens, "previous_response_id": None, "store": False,
            "text": {"format": {"type": "text"}}, "truncation": "disabled", "usage": usage,
            "completed_at": int(time.time()) if status != "in_progress" else None}


def message_item(rid: str, text: str, status: str) -> dict:
    return {"type": "message", "id": f"msg_{rid[5:]}", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


@router.post("/responses")
async def create_response(body: ResponseBody, request: Request, key: Key):
    refuse_unsupported(body)
    engine = _engine(request, body.model, key)
    if body.model in engine.heads:
        raise APIError(400, f"model '{body.model}' is a trained head: ask it through /v1/chat/completions",
                       param="model", code="unsupported_model")
    messages = to_messages(body)
    _check_prompt_size(engine, [m["content"] for m in messages])
    ids = engine.chat_prompt_ids(messages)
    budget = _token_budget(request, engine, len(ids), body.max_output_tokens, DEFAULT_MAX_OUTPUT)
    params = GenParams(budget, 1.0 if body.temperature is None else body.temperature,
                       1.0 if body.top_p is None else body.top_p, (), None)
    job = engine.submit(body.model, ids, [params], stream=body.stream)
    rid, created = f"resp_{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return StreamingResponse(_events(job, body, rid, created), media_type="text/event-stream")
    [[gen]] = await _results(request, [job])
    return response_object(body, rid, created, _status(gen), gen.text, gen)


def _status(gen: Generation) -> str:
    return "incomplete" if gen.finish_reason == "length" else "completed"


async def _events(job, body: ResponseBody, rid: str, created: int):
    """OpenAI's Responses event stream; a client that leaves cancels the generation."""
    seq = iter(range(1_000_000))
    item_id = f"msg_{rid[5:]}"

    def event(kind: str, **fields) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': next(seq), **fields}, ensure_ascii=False)}\n\n"

    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    try:
        yield event("response.created", response=response_object(body, rid, created, "in_progress"))
        yield event("response.in_progress", response=response_object(body, rid, created, "in_progress"))
        yield event("response.output_item.added", output_index=0, item=message_item(rid, "", "in_progress") | {"content": []})
        yield event("response.content_part.added", **where, part={"type": "output_text", "text": "", "annotations": []})
        async for _, item in job.events():
            if isinstance(item, Generation):
                status = _status(item)
                part = {"type": "output_text", "text": item.text, "annotations": [], "logprobs": []}
                yield event("response.output_text.done", **where, text=item.text, logprobs=[])
                yield event("response.content_part.done", **where, part=part)
                yield event("response.output_item.done", output_index=0, item=message_item(rid, item.text, status))
                yield event(f"response.{status}", response=response_object(body, rid, created, status, item.text, item))
            elif item:
                yield event("response.output_text.delta", **where, delta=item, logprobs=[])
    except APIError as exc:  # e.g. the server is shutting down mid-stream
        yield event("error", code=exc.body["code"], message=exc.body["message"], param=exc.body["param"])
    finally:
        job.cancel()
