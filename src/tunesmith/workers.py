"""Worker processes at the lowest CPU priority, for work a server does on a caller's behalf that would otherwise take
the CPU (and, in Python, the GIL) its other callers' requests need: scoring texts, embedding them.

Each worker is ``python -m <module>`` (the module calls :func:`serve_lines`), reached over its stdin and stdout: one
JSON request a line, one JSON answer a line (an answer may be megabytes: it is passed on as bytes, never parsed
here). Workers start on first use, are kept, run at ``nice`` 19 (a server's own threads go first whenever they want
the CPU), and end by the end of their pipe when the server goes, however it goes. At most ``size`` are in use at once;
the next caller waits for one.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable

WORKER_ERROR = b'{"worker_error": '  # how an answer that is the worker's error starts


class WorkerError(RuntimeError):
    """A worker could not answer: it failed on the request, or it ended."""


class _Worker:
    def __init__(self, module: str):
        self.proc = subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        try:
            os.setpriority(os.PRIO_PROCESS, self.proc.pid, 19)
        except OSError:
            pass  # it runs at the caller's priority

    def ask(self, request: dict) -> bytes:
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except OSError as exc:
            raise WorkerError(f"the worker ended: {exc}") from None
        if not line:
            raise WorkerError(f"the worker ended (exit status {self.proc.poll()})")
        if line.startswith(WORKER_ERROR):
            raise WorkerError(json.loads(line)["worker_error"])
        return line

    def end(self) -> None:
        self.proc.kill()
        self.proc.wait()


class LowPriorityWorkers:
    """Up to ``size`` workers running ``module``, each answering one request at a time."""

    def __init__(self, module: str, size: int = 2):
        self.module = module
        self.idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self.free = threading.Semaphore(size)

    def ask(self, request: dict) -> bytes:
        """The answer line to ``request`` from a free worker (waits for one); :class:`WorkerError` when it fails.
        A worker that failed is ended and replaced on the next call."""
        self.free.acquire()
        try:
            worker = self.idle.get_nowait()
        except queue.Empty:
            try:
                worker = _Worker(self.module)
            except BaseException:
                self.free.release()
                raise
        try:
            answer = worker.ask(request)
        except BaseException as exc:
            if not isinstance(exc, WorkerError) or worker.proc.poll() is not None:
                worker.end()
                worker = None
            raise
        finally:
            if worker is not None:
                self.idle.put(worker)
            self.free.release()
        return answer


def serve_lines(handle: Callable[[dict], bytes | dict]) -> None:
    """A worker's main loop: each request line answered by ``handle`` (a dict, or JSON bytes without a line break);
    an exception is the request's :class:`WorkerError`, and the worker goes on."""
    for line in sys.stdin.buffer:
        try:
            answer = handle(json.loads(line))
            out = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        except Exception as exc:  # noqa: BLE001 - the caller gets the error; the worker goes on
            out = WORKER_ERROR + json.dumps(f"{type(exc).__name__}: {exc}"[:500]).encode() + b"}"
        sys.stdout.buffer.write(out + b"\n")
        sys.stdout.buffer.flush()
