"""A per-call SQLite cache: every completed LLM call is committed as soon as it returns.

A crash, Ctrl-C or SIGKILL loses only the calls that were in flight; a rerun re-issues those
and nothing else, and a rerun of a finished job makes zero calls.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from tunesmith.synth.calls import ChatReply

SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    key TEXT PRIMARY KEY,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    request TEXT NOT NULL,
    texts TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    created_at REAL NOT NULL
)
"""


class CallCache:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(SCHEMA)

    def get(self, key: str) -> ChatReply | None:
        row = self.db.execute("SELECT texts, prompt_tokens, completion_tokens FROM calls WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return ChatReply(json.loads(row[0]), row[1], row[2], cached=True)

    def put(self, key: str, endpoint: str, model: str, request_json: str, reply: ChatReply) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO calls VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key, endpoint, model, request_json, json.dumps(reply.texts, ensure_ascii=False),
             reply.prompt_tokens, reply.completion_tokens, time.time()),
        )

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]

    def close(self) -> None:
        self.db.close()
