"""The Tinker API's futures: every training or sampling call is answered at once with a request id, runs in the
``tinker`` lane (one call at a time on the resident base, keys served in turn), and its answer is fetched by
``/api/v1/retrieve_future``, which waits up to :data:`POLL_S` and otherwise says ``try_again``.

Steps of several keys run as one: when a ``forward_backward`` call's turn comes, the ``forward_backward`` calls at the
head of other keys' waiting calls (each key's next call, so every key's calls still run in its order) join it, up to
:data:`FUSED_KEYS` keys, in one step on the base (:meth:`TinkerService.forward_backward_many`); each is answered at
once, and its own turn in the lane, when it comes, has nothing left to do.

Futures live in the memory of the replica that took the call, for :data:`KEPT_S` after they end; a key may have
:data:`PENDING_PER_KEY` waiting at once (past it, a 429 the SDK retries). Another key's future is not found.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tunesmith.serve.errors import APIError
from tunesmith.serve.store import new_id

log = logging.getLogger("tunesmith.serve")
POLL_S = 20.0  # a retrieve waits this long for its answer before saying try_again (the SDK waits 45 s)
KEPT_S = 3600.0  # an answer is kept this long after it is ready
PENDING_PER_KEY = 256
FUSED_KEYS = 8  # keys whose forward_backward calls one step may take together
ANSWERED = object()  # a call's lane turn, once a step of another key's answered it


@dataclass
class Failed:
    """What a call's turn ended with when it failed (returned, not raised: the lane's own failures are told apart)."""

    exc: BaseException


@dataclass
class Pending:
    owner: str | None
    kind: str
    done: asyncio.Event = field(default_factory=asyncio.Event)
    answer: bytes | dict | None = None
    error: tuple[str, str] | None = None  # (message, category: "user" or "server")
    ended: float | None = None
    task: asyncio.Task | None = None  # held here: the loop keeps only a weak reference to a task
    fusable: tuple | None = None  # a forward_backward's own arguments: it may join another key's step
    started: bool = False  # taken by its own turn or by another key's step (under Futures.guard)


class Futures:
    def __init__(self, lane, fuse: Callable[[list[tuple]], list] | None = None):
        """``fuse``: runs several keys' forward_backward calls as one step (their answers or exceptions, in order)."""
        self.lane, self.fuse = lane, fuse
        self.items: dict[str, Pending] = {}
        self.waiting: dict[str | None, deque[Pending]] = {}  # each key's calls not taken yet, in its order
        self.guard = threading.Lock()  # the waiting calls, read by the lane's thread
        self.fused_steps = 0  # steps that took calls of more than one key
        self.loop: asyncio.AbstractEventLoop | None = None

    def submit(self, owner: str | None, kind: str, fn, *args, fusable: bool = False) -> str:
        """``fn(*args)`` queued in the lane as ``owner``'s work (``fusable``: a forward_backward, whose ``args`` may
        join a step of several keys); its request id."""
        self._prune()
        self.loop = asyncio.get_running_loop()
        waiting = sum(1 for p in self.items.values() if p.owner == owner and not p.done.is_set())
        if waiting >= PENDING_PER_KEY:
            raise APIError(429, f"This API key has {waiting} Tinker calls waiting (at most {PENDING_PER_KEY}); retry "
                           "shortly.", type_="requests", code="rate_limit_exceeded", headers={"retry-after": "1"})
        rid = new_id("req")
        pending = self.items[rid] = Pending(owner, kind, fusable=args if fusable else None)
        with self.guard:
            self.waiting.setdefault(owner, deque()).append(pending)
        pending.task = asyncio.ensure_future(self._run(pending, fn, args))
        return rid

    async def _run(self, pending: Pending, fn, args) -> None:
        try:
            answer = await self.lane.run(pending.owner, self._turn, pending, fn, args, always=True)
        except Exception as exc:  # noqa: BLE001 - the lane refused it (full, closed): said in its future
            with self.guard:
                taken = self._take(pending)  # False: a step of another key took it (its answer comes from there)
            answer = Failed(exc) if taken else ANSWERED
        finally:
            pending.task = None
        if answer is not ANSWERED:
            self._settle(pending, answer.exc if isinstance(answer, Failed) else answer)

    def _take(self, pending: Pending) -> bool:
        """Under :attr:`guard`: the call taken out of its key's waiting calls; False when it was taken already."""
        if pending.started:
            return False
        pending.started = True
        queue = self.waiting.get(pending.owner)
        if queue is not None:
            queue.remove(pending)
            if not queue:
                del self.waiting[pending.owner]
        return True

    def _turn(self, pending: Pending, fn, args):
        """The call's turn in the lane (its thread): run it, with the forward_backward calls at the head of other
        keys' waiting calls when it is one; :data:`ANSWERED` when another key's step has answered it already."""
        with self.guard:
            if not self._take(pending):
                return ANSWERED
            joined = []
            if pending.fusable is not None and self.fuse is not None:
                for queue in list(self.waiting.values()):
                    if len(joined) + 1 >= FUSED_KEYS:
                        break
                    head = queue[0]
                    if head.owner != pending.owner and head.fusable is not None:
                        self._take(head)
                        joined.append(head)
        if not joined:
            try:
                return fn(*args)
            except Exception as exc:  # noqa: BLE001 - said in its future
                return Failed(exc)
        self.fused_steps += 1
        try:
            answers = self.fuse([pending.fusable] + [p.fusable for p in joined])
        except Exception as exc:  # noqa: BLE001 - every call of the step ends with it
            answers = [exc] * (1 + len(joined))
        for other, answer in zip(joined, answers[1:], strict=True):
            self.loop.call_soon_threadsafe(self._settle, other, answer)
        return Failed(answers[0]) if isinstance(answers[0], BaseException) else answers[0]

    def _settle(self, pending: Pending, answer) -> None:
        """The call's answer, or the failure the caller reads from its future (on the event loop)."""
        from tunesmith.serve.tinker.trainer import TrainingError
        from tunesmith.serve.tinker.wire import WireError

        if isinstance(answer, (TrainingError, WireError, APIError)):
            pending.error = (answer.body["message"] if isinstance(answer, APIError) else str(answer), "user")
        elif isinstance(answer, BaseException):
            log.error("Tinker %s failed", pending.kind, exc_info=answer)
            pending.error = (f"The server failed on this {pending.kind}: {type(answer).__name__}: {answer}", "server")
        else:
            pending.answer = answer
        pending.ended = time.monotonic()
        pending.done.set()

    async def retrieve(self, rid: str, owner: str | None) -> Pending | None:
        """The future once it has ended, or None while it still runs after :data:`POLL_S`; a 404 when it is not
        this key's (or not known here)."""
        pending = self.items.get(rid)
        if pending is None or pending.owner != owner:
            raise APIError(404, f"No future {rid!r} on this server for this key (futures are kept {KEPT_S:.0f} s "
                           "after they end, on the replica that took the call).", code="not_found")
        try:
            await asyncio.wait_for(pending.done.wait(), POLL_S)
        except TimeoutError:
            return None
        return pending

    def _prune(self) -> None:
        now = time.monotonic()
        for rid in [r for r, p in self.items.items() if p.ended is not None and now - p.ended > KEPT_S]:
            del self.items[rid]
