"""Reference metrics scored in worker processes of their own, at the lowest CPU priority.

BLEU, GLEU, METEOR and ROUGE-N are pure Python: scored in a thread of the server, a long text holds the GIL the
engine's decoding thread needs between its kernels, and a generation beside one such grader took twice as long. So
pairs past :data:`INLINE_CHARS` are scored by up to :data:`WORKERS` worker processes (``python -m
tunesmith.graders.pool``, JSON lines over a pipe; started on first use, kept, ended by the end of their pipe when the
server goes) running at ``nice`` 19, so a grader gets only the CPU nobody else asks for. A text past
:data:`MAX_CHARS` is not scored at all (its row's ``other_error``): no metric's cost is left to a caller's input.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Sequence

INLINE_CHARS = 4_000  # pairs whose texts together are this short are scored in the calling thread
MAX_CHARS = 20_000  # the longest text a similarity metric compares (GLEU of two such texts: about a second)
CHUNK_CHARS = 1_000_000  # the most text one message to a worker carries
WORKERS = 2


class PoolError(RuntimeError):
    """A worker process failed or ended while scoring."""


def too_long(text: str, reference: str) -> bool:
    return len(text) > MAX_CHARS or len(reference) > MAX_CHARS


def similarities(metric: str, pairs: Sequence[tuple[str, str]]) -> list[float]:
    """Each pair's ``metric`` score (:func:`tunesmith.graders.text.similarity`), in a worker process unless the
    pairs are short; :class:`PoolError` when the worker fails."""
    pairs = list(pairs)
    if sum(len(a) + len(b) for a, b in pairs) <= INLINE_CHARS:
        return _score(metric, pairs)
    worker = _take()
    try:
        scores = [s for chunk in _chunks(pairs) for s in worker.score(metric, chunk)]
    except BaseException:
        worker.end()
        _give(None)
        raise
    _give(worker)
    return scores


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


class _Worker:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "tunesmith.graders.pool"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            os.setpriority(os.PRIO_PROCESS, self.proc.pid, 19)
        except OSError:
            pass  # the worker runs at the server's priority

    def score(self, metric: str, pairs: list[tuple[str, str]]) -> list[float]:
        try:
            self.proc.stdin.write(json.dumps({"metric": metric, "pairs": pairs}).encode() + b"\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except OSError as exc:
            raise PoolError(f"the grading worker ended: {exc}") from None
        if not line:
            raise PoolError(f"the grading worker ended (exit status {self.proc.poll()})")
        answer = json.loads(line)
        if "error" in answer:
            raise PoolError(answer["error"])
        return answer["scores"]

    def end(self) -> None:
        self.proc.kill()
        self.proc.wait()


_idle: queue.LifoQueue = queue.LifoQueue()
_free = threading.Semaphore(WORKERS)


def _take() -> _Worker:
    """An idle worker, or a new one: at most :data:`WORKERS` are in use at once (the next caller waits)."""
    _free.acquire()
    try:
        return _idle.get_nowait()
    except queue.Empty:
        return _Worker()


def _give(worker: _Worker | None) -> None:
    if worker is not None:
        _idle.put(worker)
    _free.release()


def main() -> None:
    """The worker: one JSON request a line on stdin (``{"metric", "pairs"}``), one answer a line on stdout."""
    for line in sys.stdin.buffer:
        request = json.loads(line)
        try:
            answer = {"scores": _score(request["metric"], [tuple(p) for p in request["pairs"]])}
        except Exception as exc:  # noqa: BLE001 - the caller's rows get the error
            answer = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
