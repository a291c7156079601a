"""Chat JSONL for ``tunesmith init``: each conversation as a prompt/completion row (its last assistant message is the
completion), a system message every conversation shares kept for the recipe's system prompt, and the rows written
next to the recipe, streamed from the whole file when init read only its first rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from tunesmith.errors import DataError
from tunesmith.records import Record

if TYPE_CHECKING:  # starter calls this module; it reads what starter found
    from tunesmith.runs.starter import Start


def chat_pairs(records: list[Record]) -> tuple[list[dict], str | None]:
    """Chat JSONL as prompt/completion rows (:func:`chat_pair`). A system message all conversations share becomes
    the recipe's system prompt (returned); one that differs stays in the prompt."""
    systems = {system_of(r) for r in records}
    shared = systems.pop() if len(systems) == 1 else None
    return [chat_pair(r, shared) for r in records], shared


def system_of(r: Record) -> str:
    """The conversation's first system message before its last assistant turn ("" when it has none)."""
    return _first_system(*turns_of(r))


def _first_system(msgs: list[dict], last: int) -> str:
    sys_msgs = [m for m in msgs[:last] if m.get("role") == "system"]
    return sys_msgs[0].get("content", "") if sys_msgs else ""


def turns_of(r: Record) -> tuple[list[dict], int]:
    """The conversation's messages and the index of its last assistant message (the answer to learn)."""
    msgs = [m for m in r.data.get("messages") or [] if isinstance(m, dict)]
    last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise DataError(f"{r.source}: a conversation without an assistant message to learn")
    return msgs, last


def chat_pair(r: Record, shared: str | None) -> dict:
    """One conversation as a prompt/completion row: the last assistant message is the completion, the turns
    before it the prompt (earlier turns written as ``role: text`` lines); its system messages are left to the
    recipe's system prompt when its first one is ``shared``."""
    msgs, last = turns_of(r)
    drop = shared is not None and _first_system(msgs, last) == shared
    turns = [m for m in msgs[:last] if not (m.get("role") == "system" and drop)]
    prompt = turns[-1].get("content", "") if len(turns) == 1 else "\n".join(
        f"{m.get('role')}: {m.get('content', '')}" for m in turns)
    return {"prompt": prompt, "completion": msgs[last].get("content") or ""}


def write_chat_pairs(start: Start, path: Path, say=print) -> None:
    """The conversations as prompt/completion rows in ``path``: the rows init read, or, when it read only the
    first rows, every conversation of the file streamed through the same reader (unreadable lines said)."""
    bad: list = []
    rows = (r.data for r in start.records) if start.complete else whole_chat(start, bad)
    n = 0
    try:
        with open(path, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
    except DataError:
        path.unlink(missing_ok=True)
        raise
    if bad:
        say(f"unreadable: {len(bad):,} conversation(s) in the whole file, left out of {path.name} "
            f"(first: {bad[0].source}: {bad[0].reason})")
    say(f"conversations as prompt/completion rows ({n:,}) → {path}")


def whole_chat(start: Start, bad: list):
    """Every conversation of the chat file as a prompt/completion row, read as the data stage reads JSONL;
    unreadable lines are appended to ``bad``."""
    from tunesmith.data.read.readers import file_rows
    from tunesmith.records import Rejected

    items, _ = file_rows(start.data, "jsonl", lenient=True)
    for item in items:
        if isinstance(item, Rejected):
            bad.append(item)
        else:
            yield chat_pair(item, start.system_prompt)
