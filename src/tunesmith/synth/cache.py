"""A per-call SQLite cache, and :func:`run_calls`, which issues LLM calls through it.

Cached calls are reused, identical requests are made once, and every completed call is committed
the moment it returns: a crash, Ctrl-C or SIGKILL loses only the calls that were in flight; a rerun
re-issues those and nothing else, and a rerun of a finished job makes zero calls.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from tunesmith.clients.calls import CallFailure, CallStats, ChatReply, ChatRequest

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


def run_calls(
    client,
    cache: CallCache,
    requests: Sequence[ChatRequest],
    stats: CallStats | None = None,
    price_input_per_m: float = 0.0,
    price_output_per_m: float = 0.0,
    advance: Callable[[int], None] = lambda n: None,
) -> tuple[list[ChatReply | CallFailure], CallStats]:
    """Issue ``requests`` through the cache: cached calls are reused, identical requests are made once and
    each new reply is committed as it arrives. One reply (or failure) per request, in order, and the
    accumulated call statistics."""
    stats = stats or CallStats()
    start = time.time()
    keys = [r.cache_key(client.endpoint, client.model) for r in requests]
    results: list[ChatReply | CallFailure | None] = [None] * len(requests)
    todo: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        hit = cache.get(key)
        if hit is not None:
            results[i] = hit
            stats.cache_hits += 1
        else:
            todo.setdefault(key, []).append(i)
    advance(len(requests) - sum(len(v) for v in todo.values()))
    pending_keys = list(todo)
    pending = [requests[todo[k][0]] for k in pending_keys]
    retries_before = client.retries_done

    def on_result(j: int, result: ChatReply | CallFailure) -> None:
        key = pending_keys[j]
        if isinstance(result, ChatReply):
            cache.put(key, client.endpoint, client.model, json.dumps(asdict(pending[j]), ensure_ascii=False), result)
            stats.calls_made += 1
            stats.prompt_tokens += result.prompt_tokens
            stats.completion_tokens += result.completion_tokens
        else:
            stats.failures += 1
            stats.failure_kinds[result.kind] = stats.failure_kinds.get(result.kind, 0) + 1
        for i in todo[key]:
            results[i] = result
        advance(len(todo[key]))

    try:
        client.run(pending, on_result)
    finally:
        stats.requests += len(requests)
        stats.retries += client.retries_done - retries_before
        stats.cost_usd = (stats.prompt_tokens * price_input_per_m + stats.completion_tokens * price_output_per_m) / 1e6
        stats.seconds += time.time() - start
    return results, stats
