"""A request's conversation as chat messages: chat's ``messages`` as the dicts the chat template takes, and
Responses' ``input`` items and function tools in chat's shape (the Responses API is planned as a chat request)."""

from __future__ import annotations

from tunesmith.data.formats.chat import MESSAGE_KEYS, check_messages, hint
from tunesmith.serve.errors import APIError
from tunesmith.serve.store.values import check_value

ROLES = {"user", "assistant", "system", "developer"}
TEXT_PARTS = {"input_text", "output_text", "text"}


def chat_messages(body) -> list[dict]:
    """The request's messages as dicts of the keys a chat message has (a client's echo of an answer also
    carries ``refusal``, ``audio``…); tool calls and tool results are checked by the fine-tuning rules
    (every call answered by a tool message with its id), a break is a 400 on ``messages``."""
    messages = [{k: v for k, v in m.model_dump().items() if k in MESSAGE_KEYS and v is not None} for m in body.messages]
    for m in messages:
        m.setdefault("content", None if m["role"] == "assistant" else "")
    if any(m.get("tool_calls") or m.get("function_call") or m["role"] == "tool" for m in messages):
        errors = [e for e in check_messages(messages, final_calls_open=False) if e != "missing_content"]
        if errors:
            raise APIError(400, f"Invalid 'messages': {errors[0]}: {hint(errors[0])}.", param="messages")
    return messages


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


def chat_tools(body) -> tuple[list[dict] | None, str | dict | None]:
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


def check_text(value, param: str) -> None:
    """400 on the first string inside ``value`` (a request field: text, or lists and objects of it, their keys
    included) holding a lone UTF-16 surrogate (``"\\ud800"``, which JSON lets through and no tokenizer or text
    encoding can hold), naming where it is; a NUL is text here (:mod:`tunesmith.serve.store.values`)."""
    check_value(value, param, nul_ok=True)
