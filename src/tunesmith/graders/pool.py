"""Reference metrics scored in worker processes of their own, at the lowest CPU priority.

BLEU, GLEU, METEOR and ROUGE-N are pure Python: scored in a thread of the server, a long text holds the GIL the
engine's decoding thread needs between its kernels, and a generation beside one such grader took twice as long. So
pairs past :data:`INLINE_CHARS` are scored by up to :data:`WORKERS` workers (``python -m tunesmith.graders.pool``,
:mod:`tunesmith.workers`: ``nice`` 19, gone with their server), so a grader gets only the CPU nobody else asks for.
A text past :data:`MAX_CHARS` is not scored at all (its row's ``other_error``): no metric's cost is left to a
caller's input.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from tunesmith.workers import LowPriorityWorkers, WorkerError, serve_lines

INLINE_CHARS = 4_000  # pairs whose texts together are this short are scored in the calling thread
MAX_CHARS = 20_000  # the longest text a similarity metric compares (GLEU of two such texts: about a second)
CHUNK_CHARS = 1_000_000  # the most text one request to a worker carries
WORKERS = 2

PoolError = WorkerError
_workers = LowPriorityWorkers("tunesmith.graders.pool", WORKERS)


def too_long(text: str, reference: str) -> bool:
    return len(text) > MAX_CHARS or len(reference) > MAX_CHARS


def similarities(metric: str, pairs: Sequence[tuple[str, str]]) -> list[float]:
    """Each pair's ``metric`` score (:func:`tunesmith.graders.text.similarity`), in a worker process unless the
    pairs are short; :class:`PoolError` when the worker fails."""
    pairs = list(pairs)
    if sum(len(a) + len(b) for a, b in pairs) <= INLINE_CHARS:
        return _score(metric, pairs)
    return [s for chunk in _chunks(pairs) for s in json.loads(_workers.ask({"metric": metric, "pairs": chunk}))]


def _score(metric: str, pairs: list[tuple[str, str]]) -> list[float]:
    from tunesmith.graders.text import similarity

    return [similarity(metric, a, b) for a, b in pairs]


def _chunks(pairs: list[tuple[str, str]]):
    chunk, size = [], 0
    for a, b in pairs:
        if chunk and size + len(a) + len(b) > CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
        chunk.append((a, b))
        size += len(a) + len(b)
    if chunk:
        yield chunk


def _handle(request: dict) -> bytes:
    return json.dumps(_score(request["metric"], [tuple(p) for p in request["pairs"]])).encode()


if __name__ == "__main__":
    serve_lines(_handle)
