"""How an answer is read: a choice's generated text as OpenAI's chat deltas and message (text as ``content``,
the calls the tool plan lets the model make as ``tool_calls``), streamed or whole; a text completion's choice (the
echoed prompt, its logprobs and the answer's).

A forced call to one function generates only its arguments (the prompt holds the call's opening and the caller's
function name): the call's first delta goes out at once, its arguments as they are generated. A call cut short
(``max_tokens``, a stop string) is still a call, its arguments as far as they were generated, and the choice's
finish reason is the generation's own (``length``), never ``tool_calls``, and never the template's markup as
``content``."""

from __future__ import annotations

import json
import re
import uuid

from tunesmith.data.formats.tool_format import CallStream, read_call
from tunesmith.serve.plan.tools import ToolPlan

_CALL_START = '{"name": "'
_NAME = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)(")?')
_ARGUMENTS = re.compile(r'\s*,\s*"arguments"\s*:\s*')


class ChoiceDeltas:
    """One choice's generated text → OpenAI chat deltas: ``{"content"}`` for text, ``{"tool_calls"}`` for
    calls (the first delta of a call with index, id, type, name and empty arguments, then the arguments)."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.calls, self.cut = plan, 0, False
        self.arguments = ArgumentsText() if plan.function is not None else None
        self.stream = CallStream() if plan.parse and self.arguments is None else None
        if self.stream is not None and plan.prefix:
            self.stream.feed(plan.prefix)

    def feed(self, text: str) -> list[dict]:
        if self.arguments is not None:
            return self._forced(self.arguments.feed(text))
        if self.stream is None:
            return [{"content": text}] if text else []
        return self._deltas(self.stream.feed(text))

    def close(self) -> list[dict]:
        if self.arguments is not None:
            self.cut = not self.arguments.done
            return self._forced("")
        if self.stream is None:
            return []
        if self.stream.in_call and read_call(self.stream.buf.strip()) is None:
            call = partial_call(self.stream.buf, [t["function"]["name"] for t in self.plan.tools or []])
            if call is not None:  # a call cut short: a call all the same, as far as it was written
                self.stream.buf, self.stream.in_call = "", False
                self.cut = not call.pop("whole")
                return self._deltas([("call", call)])
        return self._deltas(self.stream.close())

    def finish_reason(self, reason: str) -> str:
        """``tool_calls`` for an answer with whole calls; an answer that ended inside a call keeps the generation's
        own reason (``length``), as OpenAI says of a call cut by ``max_tokens``."""
        return "tool_calls" if self.calls and not self.cut else reason

    def _forced(self, arguments: str) -> list[dict]:
        out = []
        if not self.calls:
            out.append(_opening(0, self.plan.function))
            self.calls = 1
        if arguments:
            out.append({"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]})
        return out

    def _deltas(self, events) -> list[dict]:
        out = []
        for kind, value in events:
            if kind == "content":
                if not (self.calls and not value.strip()):  # the newlines between calls are not content
                    out.append({"content": value})
            elif self.plan.parallel or not self.calls:  # parallel_tool_calls: false answers the first call only
                arguments = value["arguments"]
                text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
                out += [_opening(self.calls, value["name"]),
                        {"tool_calls": [{"index": self.calls, "function": {"arguments": text}}]}]
                self.calls += 1
        return out


def _opening(index: int, name: str) -> dict:
    return {"tool_calls": [{"index": index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                            "function": {"name": name, "arguments": ""}}]}


class ArgumentsText:
    """A forced call's arguments as they are generated: the object's text without the space before it, up to where
    it closes (the call's closing brace after it is the wrapper's, not the arguments'). ``done``: it closed."""

    def __init__(self) -> None:
        self.depth, self.in_string, self.escaped, self.started, self.done = 0, False, False, False, False

    def feed(self, text: str) -> str:
        out = []
        for ch in text:
            if self.done:
                break
            if not self.started and ch.isspace():
                continue
            self.started = True
            out.append(ch)
            if self.in_string:
                self.escaped, self.in_string = (False, True) if self.escaped else (ch == "\\", ch != '"')
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                self.done = self.depth == 0
        return "".join(out)


def partial_call(body: str, names: list[str]) -> dict | None:
    """A call whose text ends before it closes, as ``{"name", "arguments", "whole"}``: the name as far as it was
    written (the one tool it can only be, where a single one starts so), the arguments' text as far as it was
    generated, and whether the arguments object is whole. None when ``body`` does not start as a call."""
    text = body.lstrip()
    match = _NAME.match(text)
    if match is None:
        if not _CALL_START.startswith(re.sub(r"\s+", " ", text).replace('{ "', '{"')):
            return None
        written, closed, rest = "", False, ""
    else:
        written, closed, rest = match.group(1), match.group(2) is not None, text[match.end():]
    try:
        name = json.loads(f'"{written}"')
    except json.JSONDecodeError:
        name = written
    if not closed and len(starting := [n for n in names if n.startswith(name)]) == 1:
        name = starting[0]
    separator = _ARGUMENTS.match(rest) if closed else None
    arguments = ArgumentsText()
    text = arguments.feed(rest[separator.end():]) if separator else ""
    return {"name": name, "arguments": text, "whole": arguments.done}


def message(plan: ToolPlan, text: str) -> tuple[dict, bool]:
    """A whole answer as an assistant message, and whether it called tools (whole calls: an answer that ended
    inside a call carries the call, and says False so that its finish reason stays the generation's)."""
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
    return msg, bool(calls) and not reader.cut


def completion_choice(plan, index: int, gen) -> dict:
    """Choice ``index`` of a text_completion (prompt ``index // n``): the echoed prompt before the answer, and with
    ``logprobs`` the scored prompt's entries (the first without a logprob: nothing comes before it) before the
    answer's (:func:`answer_entries`), offsets counted from the choice's start."""
    head = plan.texts[index // plan.n] if plan.echo else ""
    entries = None if gen.logprobs is None else [*(gen.prompt_logprobs or []), *answer_entries(gen)]
    return {"index": index, "text": head + gen.text, "finish_reason": gen.finish_reason,
            "logprobs": completion_logprobs(entries, 0 if gen.prompt_logprobs else len(head))}


def answer_entries(gen) -> list[dict]:
    """The logprobs entries of every generated token the answer keeps: a stop string cuts the text inside or before
    the tokens that made it, and their entries go with it; the end of sequence that ended the answer is listed last,
    as OpenAI's legacy models and vLLM list it (a harness reads the prompt's entries as all but the last)."""
    entries = gen.logprobs
    if gen.finish_reason == "stop" and gen.end is None:  # cut by a stop string
        kept, at = [], 0
        for e in entries:
            if at >= len(gen.text):
                break
            kept.append(e)
            at += len(e["token"])
        entries = kept
    return [*entries, *([gen.end] if gen.end else [])]


def completion_logprobs(entries: list[dict] | None, start: int = 0) -> dict | None:
    """Chat-style logprobs entries as a completion's ``logprobs``: tokens, token_logprobs, top_logprobs (the most
    likely tokens and the chosen one, up to ``logprobs`` + 1, as OpenAI's spec says; None where the logprob is) and
    text_offset (each token's character offset in the choice's text, from ``start``)."""
    if entries is None:
        return None
    offsets, at = [], start
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [None if e["top_logprobs"] is None else _with_chosen(e) for e in entries],
            "text_offset": offsets}


def _with_chosen(entry: dict) -> dict[str, float]:
    top = {t["token"]: t["logprob"] for t in entry["top_logprobs"]}
    return top if entry["token"] in top else top | {entry["token"]: entry["logprob"]}
