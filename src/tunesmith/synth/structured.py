"""Ask for JSON, parse replies tolerantly, validate with pydantic, retry the unparseable.

Small models wrap JSON in code fences, add a sentence before or after it, or stop halfway.
We take the first balanced JSON object or array in the reply; a reply that still does not
validate is asked again (a new attempt, so a new cache key and seed) up to a limit, and then
set aside with the raw text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pydantic import BaseModel, ValidationError

from tunesmith.clients.calls import CallFailure, CallStats, ChatReply, ChatRequest

FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_json(text: str) -> Any:
    """The first JSON value (object or array) in ``text``; raises ValueError when there is none."""
    candidates = [m.group(1) for m in FENCE.finditer(text)] + [text]
    for chunk in candidates:
        for start, ch in enumerate(chunk):
            if ch in "{[":
                end = _balanced_end(chunk, start)
                if end is not None:
                    try:
                        return json.loads(chunk[start : end + 1])
                    except json.JSONDecodeError:
                        continue
    raise ValueError("no JSON object or array found in the reply")


def _balanced_end(s: str, start: int) -> int | None:
    depth, in_str, esc = 0, False, False
    for i in range(start, len(s)):
        c = s[i]
        if in_str:
            esc = (c == "\\") and not esc
            if c == '"' and not esc:
                in_str = False
            elif c != "\\":
                esc = False
            continue
        if c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i
    return None


def parse_reply(text: str, schema: type[BaseModel]) -> BaseModel:
    """Extract and validate; a bare list is accepted for a schema with a single list field."""
    data = extract_json(text)
    if isinstance(data, list):
        list_fields = [n for n, f in schema.model_fields.items() if getattr(f.annotation, "__origin__", None) is list]
        if len(list_fields) == 1:
            data = {list_fields[0]: data}
    return schema.model_validate(data)


@dataclass
class Parsed:
    value: BaseModel | None
    raw: str
    error: str | None
    attempts: int


def run_structured(
    run: Callable[[Sequence[ChatRequest]], tuple[list[ChatReply | CallFailure], CallStats]],
    requests: Sequence[ChatRequest],
    schema: type[BaseModel],
    max_attempts: int = 3,
    max_items: int | None = None,
) -> list[Parsed]:
    """Call with the schema attached (constrained locally, ``response_format`` on endpoints), parse,
    and re-ask only the requests whose replies did not validate; re-asks are counted as retries."""
    from tunesmith.generation.constrained import bounded_schema

    budget = _string_budget(requests, schema, max_items)
    schema_text = json.dumps(bounded_schema(schema, max_items, budget), sort_keys=True)
    results: list[Parsed | None] = [None] * len(requests)
    todo = list(range(len(requests)))
    for attempt in range(max_attempts):
        if not todo:
            break
        replies, stats = run([replace(requests[i], attempt=attempt, schema=schema_text) for i in todo])
        if attempt:
            stats.reasks += len(todo)
            stats.retries += len(todo)
        retry = []
        for i, reply in zip(todo, replies, strict=True):
            if isinstance(reply, CallFailure):
                results[i] = Parsed(None, "", f"call failed ({reply.kind}): {reply.message}", attempt + 1)
                continue
            try:
                value = parse_reply(reply.text, schema)
                if budget in _string_lengths(value.model_dump()):  # the constraint stopped a text mid-way
                    raise ValueError(f"a text was cut at its length limit ({budget} characters)")
                results[i] = Parsed(value, reply.text, None, attempt + 1)
            except (ValueError, ValidationError) as exc:
                results[i] = Parsed(None, reply.text, _short(exc), attempt + 1)
                retry.append(i)
        todo = retry
    return results


def _string_lengths(data) -> set[int]:
    if isinstance(data, str):
        return {len(data)}
    values = data.values() if isinstance(data, dict) else data if isinstance(data, list) else []
    return set().union(*(_string_lengths(v) for v in values))


def _string_budget(requests: Sequence[ChatRequest], schema: type[BaseModel], max_items: int | None) -> int:
    """maxLength per string: ``max_tokens`` shared among the reply's strings at about one token per
    character (English; Hangul takes more). A reply may run past ``max_tokens`` to the schema's bound
    (see ``LocalChatClient``), so this sets the expected size, not a hard fit."""
    from tunesmith.generation.constrained import MAX_STRING_CHARS

    if not requests:
        return MAX_STRING_CHARS
    strings = (max_items or 1) * max(1, json.dumps(schema.model_json_schema()).count('"type": "string"'))
    budget = (min(r.max_tokens for r in requests) - 8 - 6 * strings) // strings
    return max(8, min(MAX_STRING_CHARS, budget))


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'reply'}: {e['msg']}" for e in exc.errors()[:3])
    return str(exc)
