"""How an answer is read: a choice's generated text as OpenAI's chat deltas and message (text as ``content``,
the calls the tool plan lets the model make as ``tool_calls``), streamed or whole."""

from __future__ import annotations

import json
import uuid

from tunesmith.data.formats.tool_format import CallStream
from tunesmith.serve.plan.tools import ToolPlan


class ChoiceDeltas:
    """One choice's generated text → OpenAI chat deltas: ``{"content"}`` for text, ``{"tool_calls"}`` for
    calls (the first delta of a call with index, id, type, name and empty arguments, then the arguments)."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.calls = plan, 0
        self.stream = CallStream() if plan.parse else None
        if self.stream is not None and plan.prefix:
            self.stream.feed(plan.prefix)

    def feed(self, text: str) -> list[dict]:
        if self.stream is None:
            return [{"content": text}] if text else []
        return self._deltas(self.stream.feed(text))

    def close(self) -> list[dict]:
        return self._deltas(self.stream.close()) if self.stream is not None else []

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.calls else reason

    def _deltas(self, events) -> list[dict]:
        out = []
        for kind, value in events:
            if kind == "content":
                if not (self.calls and not value.strip()):  # the newlines between calls are not content
                    out.append({"content": value})
            elif self.plan.parallel or not self.calls:  # parallel_tool_calls: false answers the first call only
                out += [{"tool_calls": [{"index": self.calls, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                         "function": {"name": value["name"], "arguments": ""}}]},
                        {"tool_calls": [{"index": self.calls, "function": {
                            "arguments": json.dumps(value["arguments"], ensure_ascii=False)}}]}]
                self.calls += 1
        return out


def message(plan: ToolPlan, text: str) -> tuple[dict, bool]:
    """A whole answer as an assistant message, and whether it called tools."""
    reader = ChoiceDeltas(plan)
    deltas = reader.feed(text) + reader.close()
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for c in d.get("tool_calls", []):
            entry = calls.setdefault(c["index"], {"id": c.get("id"), "type": "function",
                                                  "function": {"name": c["function"].get("name"), "arguments": ""}})
            entry["function"]["arguments"] += c["function"].get("arguments", "")
    msg = {"role": "assistant", "content": (content.strip() or None) if calls else content}
    if calls:
        msg["tool_calls"] = [calls[i] for i in sorted(calls)]
    return msg, bool(calls)
