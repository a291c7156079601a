"""Tools and tool calls as chat text, for models whose chat template has no tool syntax ("hermes" form).

OpenAI messages → plain ``{"role", "content"}`` messages that any chat template renders, in the
JSON-in-tags form that llama.cpp's and vLLM's "hermes" tool parsers read:

- the function definitions go into the system message, one JSON object a line inside
  ``<tools></tools>`` (after the example's own system text, if any);
- an assistant call is ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` after its text;
- a ``role: tool`` (or legacy ``function``) answer is a user turn
  ``<tool_response>\\n...\\n</tool_response>``.

A template that already speaks this form (Qwen2.5, Hermes: its source holds ``<tool_call>``) renders
the OpenAI messages itself. :func:`parse_tool_calls` reads the calls back from generated text.
"""

from __future__ import annotations

import json

from tunesmith.data.formats.chat import text_of

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOLS_INTRO = ("You can call these functions. Their definitions are inside <tools></tools>:\n<tools>\n{tools}\n"
               "</tools>\nTo call one, answer with <tool_call>\n{{\"name\": <function name>, \"arguments\": "
               "<arguments as a JSON object>}}\n</tool_call>")


def native_tools(tokenizer) -> bool:
    """True when the tokenizer's chat template renders tools in this form itself."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and CALL_OPEN in template and "tools" in template


def tools_block(tools: list[dict]) -> str:
    """The system text listing ``tools`` (OpenAI's ``{"type": "function", "function": {...}}`` entries)."""
    return TOOLS_INTRO.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))


def call_text(name: str, arguments) -> str:
    """One call as generated text; ``arguments`` is a JSON string (as OpenAI sends it) or a dict."""
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    return f"{CALL_OPEN}\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n{CALL_CLOSE}"


def assistant_text(m: dict) -> str:
    """An assistant message as the text the model learns to produce: its content, then its calls."""
    calls = [(c["function"]["name"], c["function"].get("arguments") or "{}") for c in m.get("tool_calls") or []]
    if m.get("function_call"):
        calls.append((m["function_call"]["name"], m["function_call"].get("arguments") or "{}"))
    parts = [text_of(m.get("content")) or ""] + [call_text(n, a) for n, a in calls]
    return "\n".join(p for p in parts if p)


def plain_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """OpenAI messages (with tools and calls) → ``{"role", "content"}`` messages in the hermes form,
    one per input message and in the same order (so per-message flags such as ``weight`` still line up),
    plus a leading system message when there are tools and no system message."""
    out = []
    for m in messages:
        role = m["role"]
        if role == "assistant":
            out.append({"role": "assistant", "content": assistant_text(m)})
        elif role in ("tool", "function"):
            out.append({"role": "user", "content": f"<tool_response>\n{text_of(m.get('content')) or ''}\n</tool_response>"})
        else:
            out.append({"role": "system" if role == "developer" else role, "content": text_of(m.get("content")) or ""})
    if tools:
        block = tools_block(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}" if out[0]["content"] else block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def template_messages(tokenizer, messages: list[dict], tools: list[dict] | None) -> tuple[list[dict], dict]:
    """What to hand ``apply_chat_template``: (messages, extra keyword arguments). A template with the
    hermes form gets the OpenAI messages and ``tools=``; any other gets :func:`plain_messages`."""
    if tools and native_tools(tokenizer):
        native = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
        for m in native:  # templates read arguments as objects
            for c in m.get("tool_calls") or []:
                if isinstance(c["function"].get("arguments"), str):
                    c["function"] = c["function"] | {"arguments": json.loads(c["function"]["arguments"])}
        return native, {"tools": tools}
    return plain_messages(messages, tools), {}


def render(tokenizer, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False) -> str:
    """The chat text of OpenAI messages (tools and calls included) under ``tokenizer``'s template."""
    msgs, extra = template_messages(tokenizer, messages, tools)
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt, **extra)


def read_call(body: str) -> dict | None:
    """``{"name", "arguments"}`` from the JSON between the tags, or None when it is not a call."""
    try:
        doc = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str):
        return None
    args = doc.get("arguments", doc.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return {"name": doc["name"], "arguments": args} if isinstance(args, dict) else None


class CallStream:
    """Reads calls out of generated text as it arrives: :meth:`feed` and :meth:`close` return events
    ``("content", text)`` and ``("call", {"name", "arguments"})``. Text that could still be the start of
    ``<tool_call>`` is held back until it is known; a tagged block that is not a JSON call is content, so
    nothing the model said is lost. A call left open when the text ends (a model that stops right after
    its JSON) is read all the same."""

    def __init__(self) -> None:
        self.buf, self.in_call = "", False

    def feed(self, text: str) -> list[tuple[str, object]]:
        self.buf += text
        events: list[tuple[str, object]] = []
        while True:
            tag = CALL_CLOSE if self.in_call else CALL_OPEN
            at = self.buf.find(tag)
            if at < 0:
                break
            head, self.buf = self.buf[:at], self.buf[at + len(tag):]
            events += self._call(head) if self.in_call else _content(head)
            self.in_call = not self.in_call
        if not self.in_call:
            held = next((k for k in range(min(len(CALL_OPEN) - 1, len(self.buf)), 0, -1)
                         if CALL_OPEN.startswith(self.buf[-k:])), 0)
            events += _content(self.buf[: len(self.buf) - held])
            self.buf = self.buf[len(self.buf) - held:]
        return events

    def close(self) -> list[tuple[str, object]]:
        events = self._call(self.buf) if self.in_call else _content(self.buf)
        self.buf, self.in_call = "", False
        return events

    @staticmethod
    def _call(body: str) -> list[tuple[str, object]]:
        call = read_call(body.strip())
        return [("call", call)] if call is not None else _content(CALL_OPEN + body + CALL_CLOSE)


def _content(text: str) -> list[tuple[str, object]]:
    return [("content", text)] if text else []


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """Generated text → (the text outside the calls, stripped, or None when empty; the calls as
    ``{"name", "arguments"}``). Without calls the text is returned as it is."""
    stream = CallStream()
    events = stream.feed(text) + stream.close()
    calls = [e for kind, e in events if kind == "call"]
    if not calls:
        return text, []
    content = "".join(e for kind, e in events if kind == "content").strip()
    return content or None, calls
