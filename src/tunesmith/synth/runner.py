"""Issue LLM calls through the cache: cached calls are reused, identical requests are made once,
and each new reply is committed the moment it arrives."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

from tunesmith.synth.cache import CallCache
from tunesmith.synth.calls import CallFailure, CallStats, ChatReply, ChatRequest


def run_calls(
    client,
    cache: CallCache,
    requests: Sequence[ChatRequest],
    stats: CallStats | None = None,
    price_input_per_m: float = 0.0,
    price_output_per_m: float = 0.0,
    advance: Callable[[int], None] = lambda n: None,
) -> tuple[list[ChatReply | CallFailure], CallStats]:
    """Return one reply (or failure) per request, in order, and the accumulated call statistics."""
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
