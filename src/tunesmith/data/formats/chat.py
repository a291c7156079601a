"""The rules of OpenAI's chat fine-tuning format, one example at a time.

One checker for every place a chat example arrives: ``tunesmith data validate``, the server's upload
check (both through :mod:`tunesmith.data.formats.validate`), the jobs worker and ``tunesmith run``'s JSONL
reader. An example is ``{"messages": [...]}`` with any number of turns, optional ``tools`` (and
``parallel_tool_calls``) or the legacy ``functions``; assistant messages may carry ``weight`` 0/1,
``tool_calls`` or the legacy ``function_call``; ``role: tool`` messages answer a call by its
``tool_call_id``. Error kinds are OpenAI's (the cookbook's names where it has one).
"""

from __future__ import annotations

import json

ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
MESSAGE_KEYS = {"role", "content", "name", "weight", "tool_calls", "tool_call_id", "function_call"}

# what each error kind means and what to do about it (shown next to the kind and its lines)
HINTS = {
    "data_type": "each line must be one JSON object",
    "missing_messages_list": "give a non-empty 'messages' list",
    "message_missing_key": "every message needs 'role', and 'content' unless it is an assistant tool call",
    "message_unrecognized_key": f"message keys are {', '.join(sorted(MESSAGE_KEYS))}",
    "unrecognized_role": f"roles are {', '.join(sorted(ROLES))}",
    "missing_content": "give text content (assistant messages may give tool_calls instead)",
    "example_missing_assistant_message": "each example needs at least one assistant message",
    "no_trained_assistant_message": "every assistant message has weight 0: nothing to train on",
    "invalid_weight": "weight is 0 or 1, and only on assistant messages",
    "invalid_tools": "tools is a list of {\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": {...}}} "
                     "with distinct names",
    "invalid_functions": "functions (legacy) is a list of {\"name\": ..., \"parameters\": {...}} with distinct names",
    "invalid_parallel_tool_calls": "parallel_tool_calls is true or false",
    "invalid_tool_calls": "tool_calls is a list of {\"id\", \"type\": \"function\", \"function\": {\"name\", \"arguments\"}} "
                          "with distinct ids, on assistant messages",
    "invalid_tool_call_arguments": "function arguments must be a string holding a JSON object",
    "invalid_function_call": "function_call (legacy) is {\"name\", \"arguments\"} on an assistant message",
    "unknown_function": "a call names a function that the example's tools/functions do not define",
    "tool_call_without_tool_message": "a tool call followed by more conversation needs a role 'tool' message "
                                      "with its tool_call_id",
    "invalid_preferred_output": "give a list of exactly one assistant message with text or tool calls",
    "invalid_non_preferred_output": "give a list of exactly one assistant message with text or tool calls",
    "tool_message_without_tool_call": "a role 'tool' message needs the tool_call_id of an earlier assistant tool call",
}


def hint(kind: str) -> str:
    return HINTS.get(kind, "")


def text_of(content) -> str | None:
    """A message's text: a string, or the text parts of a content-part list; None when neither."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


def function_names(ex: dict, errors: list[str]) -> set[str] | None:
    """Names the example's ``tools`` (or legacy ``functions``) define; None when it defines none."""
    names: set[str] | None = None
    for key, kind in (("tools", "invalid_tools"), ("functions", "invalid_functions")):
        if key not in ex or ex[key] is None:
            continue
        specs = ex[key]
        if key == "tools" and isinstance(specs, list):
            specs = [t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None for t in specs]
        good = isinstance(specs, list) and all(
            isinstance(f, dict) and isinstance(f.get("name"), str) and f["name"]
            and isinstance(f.get("parameters", {}), dict) for f in specs)
        found = [f["name"] for f in specs] if good else []
        if not good or len(set(found)) != len(found):
            errors.append(kind)
            continue
        names = (names or set()) | set(found)
    if "parallel_tool_calls" in ex and not isinstance(ex["parallel_tool_calls"], bool):
        errors.append("invalid_parallel_tool_calls")
    return names


def _arguments_ok(arguments) -> bool:
    if not isinstance(arguments, str):
        return False
    try:
        return isinstance(json.loads(arguments), dict)
    except json.JSONDecodeError:
        return False


def _calls(m: dict, errors: list[str]) -> list[tuple[str | None, str]]:
    """``(id, function name)`` of an assistant message's tool calls (legacy function_call: id None)."""
    calls = []
    if "tool_calls" in m and m["tool_calls"] is not None:
        tc = m["tool_calls"]
        good = isinstance(tc, list) and bool(tc) and all(
            isinstance(c, dict) and isinstance(c.get("id"), str) and c.get("type", "function") == "function"
            and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str) for c in tc)
        if not good or len({c["id"] for c in tc}) != len(tc):
            errors.append("invalid_tool_calls")
            return []
        if not all(_arguments_ok(c["function"].get("arguments")) for c in tc):
            errors.append("invalid_tool_call_arguments")
        calls += [(c["id"], c["function"]["name"]) for c in tc]
    if "function_call" in m and m["function_call"] is not None:
        fc = m["function_call"]
        if not isinstance(fc, dict) or not isinstance(fc.get("name"), str):
            errors.append("invalid_function_call")
        else:
            if not _arguments_ok(fc.get("arguments")):
                errors.append("invalid_tool_call_arguments")
            calls.append((None, fc["name"]))
    return calls


def _check_message(m, errors: list[str]) -> bool:
    """The per-message shape; False when the message cannot be read further."""
    if not isinstance(m, dict) or "role" not in m:
        errors.append("message_missing_key")
        return False
    if set(m) - MESSAGE_KEYS:
        errors.append("message_unrecognized_key")
    role = m["role"]
    if not isinstance(role, str) or role not in ROLES:
        errors.append("unrecognized_role")
        return False
    if role != "assistant" and "content" not in m:
        errors.append("message_missing_key")
        return False
    if "weight" in m and (role != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], bool)):
        errors.append("invalid_weight")
    if role != "assistant" and any(k in m for k in ("tool_calls", "function_call")):
        errors.append("invalid_tool_calls" if "tool_calls" in m else "invalid_function_call")
    text = text_of(m.get("content"))
    calls_given = role == "assistant" and (m.get("tool_calls") or m.get("function_call"))
    if m.get("content") is not None and text is None:
        errors.append("missing_content")
    elif not text and not calls_given and not (role == "tool" and text is not None):
        errors.append("missing_content")
    if role == "function" and not isinstance(m.get("name"), str):
        errors.append("message_missing_key")
    return True


def check_messages(messages, names: set[str] | None = None, final_calls_open: bool = True) -> list[str]:
    """Error kinds of a message list (each kind once). ``names``: the functions defined, None for no
    definitions (calls to any name are then accepted). Calls in the last message need no answer when
    ``final_calls_open`` (a training example may end on the call it teaches)."""
    errors: list[str] = []
    if not isinstance(messages, list) or not messages:
        return ["missing_messages_list"]
    open_calls: set[str] = set()
    legacy_open = False
    for i, m in enumerate(messages):
        if not _check_message(m, errors):
            continue
        role = m["role"]
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in open_calls:
                errors.append("tool_message_without_tool_call")
            else:
                open_calls.discard(call_id)
            continue
        if role == "function":
            legacy_open = False
            continue
        if open_calls or legacy_open:  # the conversation went on before every call had its answer
            errors.append("tool_call_without_tool_message")
            open_calls, legacy_open = set(), False
        if role == "assistant":
            calls = _calls(m, errors)
            if names is not None and any(name not in names for _, name in calls):
                errors.append("unknown_function")
            if i < len(messages) - 1 or not final_calls_open:
                open_calls = {cid for cid, _ in calls if cid is not None}
                legacy_open = any(cid is None for cid, _ in calls)
    return list(dict.fromkeys(errors))


def check_example(ex) -> list[str]:
    """Error kinds of one chat fine-tuning example (each kind once); [] when it trains as written."""
    if not isinstance(ex, dict):
        return ["data_type"]
    errors: list[str] = []
    names = function_names(ex, errors)
    messages = ex.get("messages")
    errors += check_messages(messages, names)
    if isinstance(messages, list) and messages:
        answers = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
        if not answers:
            errors.append("example_missing_assistant_message")
        elif all(m.get("weight", 1) == 0 for m in answers):
            errors.append("no_trained_assistant_message")
    return list(dict.fromkeys(errors))


def tools_of(ex: dict) -> list[dict] | None:
    """The example's function definitions in the ``tools`` form (legacy ``functions`` converted)."""
    tools = ex.get("tools") if isinstance(ex.get("tools"), list) else []
    functions = ex.get("functions") if isinstance(ex.get("functions"), list) else []
    return [*tools, *({"type": "function", "function": f} for f in functions)] or None
