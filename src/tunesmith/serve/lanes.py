"""Lanes: the server's bounded thread pools, one per kind of work a key can make costly, each shared fairly by keys.

Every piece of work that runs off the event loop runs in its kind's lane: planning a request (tokenizing, compiling
its schema), grading, an eval run, embedding, a trained head's reply, reading and writing files (a training file's
check, a batch's input and output), a route's store work (its queries of SQLite or PostgreSQL). A lane has a fixed
number of threads; a key holds at most ``per_key`` of them at once and keeps at most ``queued`` calls waiting, past
which its next call is a 429 naming the lane. Free threads go to the waiting keys in turn (round robin), so a key with
a hundred calls waiting never queues another key's one behind them, and one kind of work never fills the threads of
another (a crowd of graders cannot delay the plan of another key's chat, a slow query of one key another key's
stream).

A call whose caller went away while it waited leaves the line; one already running finishes in its thread, and its
place is given back only then, so a lane never runs more threads than it has.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tunesmith.serve.errors import APIError

RETRY_S = 1  # a full line's refusal: come back after about this long
PER_KEY_TINKER = 256  # a key's Tinker calls waiting at most (tunesmith.serve.tinker.futures)


@dataclass(frozen=True)
class LaneSize:
    workers: int  # threads of the lane
    per_key: int  # threads one key may hold at once
    queued: int  # one key's calls waiting at most; past it a 429
    nice: int = 0  # the lane's threads' niceness (and of the threads they start, such as torch's OpenMP team)
    torch_threads: int | None = None  # intra-op threads of the torch work a lane thread runs (None: torch's own)


class Lane:
    """A bounded thread pool for one kind of work, its threads given to keys in turn."""

    def __init__(self, name: str, size: LaneSize, what: str):
        self.name, self.size, self.what = name, size, what
        self.pool = ThreadPoolExecutor(size.workers, thread_name_prefix=f"tunesmith-{name}",
                                       initializer=start_thread, initargs=(size,))
        self.running: Counter = Counter()  # key -> threads it holds
        self.lines: dict[object, deque[asyncio.Future]] = {}  # key -> its calls waiting, in order
        self.turns: deque = deque()  # keys with calls waiting, in the order they are served

    @property
    def busy(self) -> int:
        return sum(self.running.values())

    def waiting(self, key) -> int:
        return len(self.lines.get(key, ()))

    async def run(self, key, fn, *args, deadline_s: float | None = None, cpu_s: float | None = None,
                  always: bool = False):
        """``fn(*args)`` in one of the lane's threads as ``key``'s work: waits for the key's turn, a 429 when
        ``key`` already has :attr:`LaneSize.queued` calls waiting (``always``: never refused, for the rare call that
        must run, such as undoing a step of a request that failed). ``deadline_s`` counts from the call's start in
        its thread (not its wait): past it, TimeoutError. ``cpu_s`` bounds the CPU time the call's own thread
        spends (what the call costs, whatever else the machine runs): past it, :class:`TooCostly`. Either way the
        thread finishes on its own, holding its place."""
        await self._enter(key, always)
        loop = asyncio.get_running_loop()
        clock = ThreadClock()
        try:
            future = self.pool.submit(clock.timed, fn, *args)
        except BaseException:
            self._leave(key)
            raise
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._leave, key))
        answer = asyncio.wrap_future(future)
        if cpu_s is not None:
            answer = asyncio.ensure_future(clock.bounded(answer, cpu_s))
        if deadline_s is None:
            return await answer
        return await asyncio.wait_for(answer, deadline_s)

    def refusal(self, key) -> APIError | None:
        """The 429 ``key``'s next call would get (its line is full), or None."""
        waiting = self.waiting(key)
        if waiting < self.size.queued:
            return None
        return APIError(429, f"Too many {self.what} of this API key at once: {self.running[key]} running and "
                        f"{waiting} waiting (at most {self.size.per_key} and {self.size.queued}). Retry after "
                        f"{RETRY_S} s.", type_="requests", code="rate_limit_exceeded",
                        headers={"retry-after": str(RETRY_S), "retry-after-ms": str(RETRY_S * 1000)})

    async def _enter(self, key, always: bool = False) -> None:
        if not always and (refused := self.refusal(key)):
            raise refused
        line = self.lines.get(key)
        granted = asyncio.get_running_loop().create_future()
        if line is None:
            line = self.lines[key] = deque()
            self.turns.append(key)
        line.append(granted)
        self._dispatch()
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._leave(key)  # granted as the caller left: the place goes to the next
            else:
                self._drop(key, granted)
            raise

    def _dispatch(self) -> None:
        """Give free threads to waiting keys in turn, each up to its ``per_key``."""
        while self.busy < self.size.workers and self.turns:
            for _ in range(len(self.turns)):
                key = self.turns[0]
                self.turns.rotate(-1)
                if self.running[key] < self.size.per_key:
                    break
            else:
                return  # every waiting key holds its share
            granted = self.lines[key].popleft()
            if not self.lines[key]:
                del self.lines[key]
                self.turns.remove(key)
            self.running[key] += 1
            granted.set_result(None)

    def _drop(self, key, granted: asyncio.Future) -> None:
        line = self.lines.get(key)
        if line is not None and granted in line:
            line.remove(granted)
            if not line:
                del self.lines[key]
                self.turns.remove(key)

    def _leave(self, key) -> None:
        self.running[key] -= 1
        if self.running[key] <= 0:
            del self.running[key]
        self._dispatch()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class TooCostly(TimeoutError):
    """A lane's call spent more CPU time in its thread than it was allowed."""


class ThreadClock:
    """The CPU time of the thread running one call (Linux's per-thread clock, read from another thread), so that a
    bound on a call's cost is not reached because the machine is busy with other work."""

    POLL_S = 0.25

    def __init__(self):
        self.clock_id: int | None = None
        self.started = 0.0

    def timed(self, fn, *args):
        if hasattr(time, "pthread_getcpuclockid"):
            clock_id = time.pthread_getcpuclockid(threading.get_ident())
            self.started = time.clock_gettime(clock_id)  # the same clock as spent()'s: an offset on it cancels out
            self.clock_id = clock_id
        return fn(*args)

    def spent(self) -> float:
        """CPU seconds the call has spent so far (0 before it starts, or where threads have no clock of their own)."""
        try:
            return 0.0 if self.clock_id is None else time.clock_gettime(self.clock_id) - self.started
        except OSError:  # the thread has ended: its answer is being delivered
            return 0.0

    async def bounded(self, answer: asyncio.Future, cpu_s: float):
        """``answer``, or :class:`TooCostly` once the call has spent ``cpu_s`` of CPU time."""
        while True:
            done, _ = await asyncio.wait({answer}, timeout=self.POLL_S)
            if done:
                return answer.result()
            if self.spent() > cpu_s:
                answer.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: not logged
                raise TooCostly(f"spent more than {cpu_s:g} s of CPU time")


def start_thread(size: LaneSize) -> None:
    """A lane thread's start: its niceness and its torch threads as its lane's size says."""
    if size.nice:
        lower_priority(size.nice)
    if size.torch_threads:
        torch_threads(size.torch_threads)


def all_cores() -> int:
    """This thread's torch work on every core this process may use (:func:`cores`): the engine's decoding thread,
    whatever a lane thread set before it ran (:func:`torch_threads`); how many."""
    every = cores()
    torch_threads(every)
    return every


def cores() -> int:
    """The cores this process may use: ``OMP_NUM_THREADS`` where set, else its CPU affinity."""
    return int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))


def torch_threads(threads: int) -> None:
    """This thread's torch work on ``threads`` intra-op threads (thread-local in OpenMP and MKL), kept.

    Why lanes take one: the engine's decoding thread keeps an OpenMP team of every core, and each other thread that
    runs torch with more than one thread keeps a team of its own for as long as it lives, idle or not. Once the teams'
    threads outnumber the cores, GNU OpenMP (torch's, on Linux) stops spinning between parallel regions in every team:
    a decoding step of two rows, many small products, then cost 2x (65 ms to 124-154 ms on 2 cores, measured with an
    idle second team; ``benchmarks/engine_step_rows.py --other-team``), for as long as the server ran, after its first
    Tinker call or embedding. A thread of one intra-op thread keeps no team.

    Kept: torch starts each thread's count lazily at its first parallel work, from the number any thread set last,
    which would undo a number set here before; so that start is made first (the engine's thread sets its own count,
    :func:`all_cores`, whatever a lane set)."""
    import torch

    torch.get_num_threads()  # this thread's lazy start, now
    torch.set_num_threads(threads)


def lower_priority(nice: int) -> None:
    """This thread's niceness raised to ``nice`` (Linux keeps one a thread, and a thread it starts inherits it):
    where another thread of the server wants the CPU, it goes first."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (OSError, AttributeError):  # not Linux, or not allowed: the lane runs at the process's priority
        pass


def default_sizes(cores: int | None = None) -> dict[str, LaneSize]:
    """Each lane's size for a machine of ``cores`` CPU cores. Planning is every generation request's first step: it
    has the most threads, half of them at most for one key. The store's work waits on the database more than it
    computes: more threads than cores, a quarter of them for one key, and a deep line (every route of every key
    reads the store). The others are work one key asks for at a time or in the background; one thread each per key,
    so that another key's call finds one free. The Tinker API's calls have one thread: they take turns on one resident
    base anyway, keys in turn, and a second thread running torch beside it makes both slower on a CPU (measured 1.6x
    on 2 cores: each thread that runs torch keeps an OpenMP team of its own), at ``nice`` 19 as the server's worker
    processes: the engine's decoding of every key's chat and completion requests comes first whenever it wants the
    CPU, so that a Tinker call of one key does not hold another key's chat. The lanes that run torch (Tinker,
    embeddings, heads) run it on one intra-op thread each (:func:`torch_threads`): the engine keeps every core's thread;
    on a GPU their math runs there anyway, and on a CPU a Tinker call alone takes about 1.7x as long as on two
    threads."""
    cores = cores or os.cpu_count() or 2
    plan = max(4, cores)
    two = max(2, cores // 2)
    store = max(8, 2 * cores)
    return {"plan": LaneSize(plan, plan // 2, 1024),
            "store": LaneSize(store, store // 4, 1024),
            "graders": LaneSize(two, 1, 8),
            "evals": LaneSize(two, 1, 64),
            "embeddings": LaneSize(two, 1, 8, torch_threads=1),
            "heads": LaneSize(two, 1, 256, torch_threads=1),
            "files": LaneSize(two, 1, 64),
            "tinker": LaneSize(1, 1, PER_KEY_TINKER, nice=19, torch_threads=1)}


WHAT = {"plan": "requests being planned", "store": "requests reading or writing the store", "graders": "grader runs",
        "evals": "eval runs", "embeddings": "embedding requests", "heads": "head model requests",
        "files": "file checks and batch writes", "tinker": "Tinker training and sampling calls"}


class Lanes:
    """The server's lanes by name (``app.state.lanes``): ``await lanes.plan.run(key, fn, *args)``."""

    def __init__(self, sizes: dict[str, LaneSize] | None = None):
        self.lanes = {name: Lane(name, size, WHAT[name]) for name, size in (sizes or default_sizes()).items()}

    def __getattr__(self, name: str) -> Lane:
        try:
            return self.__dict__["lanes"][name]
        except KeyError:
            raise AttributeError(name) from None

    def close(self) -> None:
        for lane in self.lanes.values():
            lane.close()
