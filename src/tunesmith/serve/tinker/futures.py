"""The Tinker API's futures: every training or sampling call is answered at once with a request id, runs in the
``tinker`` lane (one call at a time on the resident base, keys served in turn), and its answer is fetched by
``/api/v1/retrieve_future``, which waits up to :data:`POLL_S` and otherwise says ``try_again``.

Futures live in the memory of the replica that took the call, for :data:`KEPT_S` after they end; a key may have
:data:`PENDING_PER_KEY` waiting at once (past it, a 429 the SDK retries). Another key's future is not found.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from tunesmith.serve.errors import APIError
from tunesmith.serve.store import new_id

log = logging.getLogger("tunesmith.serve")
POLL_S = 20.0  # a retrieve waits this long for its answer before saying try_again (the SDK waits 45 s)
KEPT_S = 3600.0  # an answer is kept this long after it is ready
PENDING_PER_KEY = 256


@dataclass
class Pending:
    owner: str | None
    kind: str
    done: asyncio.Event = field(default_factory=asyncio.Event)
    answer: bytes | dict | None = None
    error: tuple[str, str] | None = None  # (message, category: "user" or "server")
    ended: float | None = None
    task: asyncio.Task | None = None  # held here: the loop keeps only a weak reference to a task


class Futures:
    def __init__(self, lane):
        self.lane = lane
        self.items: dict[str, Pending] = {}

    def submit(self, owner: str | None, kind: str, fn, *args) -> str:
        """``fn(*args)`` queued in the lane as ``owner``'s work; its request id."""
        self._prune()
        waiting = sum(1 for p in self.items.values() if p.owner == owner and not p.done.is_set())
        if waiting >= PENDING_PER_KEY:
            raise APIError(429, f"This API key has {waiting} Tinker calls waiting (at most {PENDING_PER_KEY}); retry "
                           "shortly.", type_="requests", code="rate_limit_exceeded", headers={"retry-after": "1"})
        rid = new_id("req")
        pending = self.items[rid] = Pending(owner, kind)
        pending.task = asyncio.ensure_future(self._run(pending, fn, args))
        return rid

    async def _run(self, pending: Pending, fn, args) -> None:
        from tunesmith.serve.tinker.trainer import TrainingError
        from tunesmith.serve.tinker.wire import WireError

        try:
            pending.answer = await self.lane.run(pending.owner, fn, *args, always=True)
        except (TrainingError, WireError, APIError) as exc:
            message = exc.body["message"] if isinstance(exc, APIError) else str(exc)
            pending.error = (message, "user")
        except Exception as exc:  # noqa: BLE001 - the caller reads the failure from its future
            log.exception("Tinker %s failed", pending.kind)
            pending.error = (f"The server failed on this {pending.kind}: {type(exc).__name__}: {exc}", "server")
        pending.ended = time.monotonic()
        pending.done.set()
        pending.task = None

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
