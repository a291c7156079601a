"""The Tinker API's futures: every training or sampling call is answered at once with a request id, and its answer is
fetched by ``/api/v1/retrieve_future``, which waits up to :data:`POLL_S` and otherwise says ``try_again``. A training
call takes its turn in the ``tinker`` lane (one call at a time on the trainer's base, keys served in turn) and runs
where the service's runner puts it (the built-in engine's thread, :meth:`Engine.run_beside`); a ``sample`` runs as
rows of the server's inference engine (:mod:`tunesmith.serve.tinker.sampling`), which shares its steps among keys.

A ``forward_backward`` call's turn takes the ``forward_backward`` call at the head of other keys' waiting calls (each
key's next call), up to :data:`FUSED_KEYS` keys and while their tokens together fit the step's budget (one pass over
the base: fusing pays by sharing a pass's fixed costs, and a call that fills a pass alone has none to share), in one
step on the base (:meth:`Tinker.forward_backward_many`; ``--no-tinker-fused-steps``: each call alone). Each joined
call is answered at once, and its own turn in the lane, when it comes, has nothing left to do.

A long call does not hold the other keys for its whole length: between two of its passes over the base, the call at
the head of each other key's waiting calls runs (:meth:`Futures.others_turn`, keys in turn, one call each), so a key's
call waits at most one pass of another key's, not the whole of it.

A future lives in the memory of the replica that took the call and, with replicas on PostgreSQL, in the store: its
row written before its id is answered, its end (an error, or its answer as a file on the shared data folder) written
when it ends, so that any replica answers ``retrieve_future`` (reading the store while the call runs elsewhere, and
saying so when the replica that took it stopped first: its presence in ``tinker_replicas``, a claim its heartbeat
renews, ran out; a run's training call is answered by whichever replica holds the run, or takes it over:
:mod:`tunesmith.serve.tinker.commands`). Futures are
kept :data:`KEPT_S` after they end; a key may have :data:`PENDING_PER_KEY` waiting at once on a replica (past it, a
429 the SDK retries). Another key's future is not found.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.serve.errors import APIError
from tunesmith.serve.store import new_id

log = logging.getLogger("tunesmith.serve")
REMOTE_POLL_S = 0.1  # how often a future another replica runs is read while it is awaited, the store's notifications
HEARD_POLL_S = 1.0  # ... unheard; while they are heard (a future's end wakes its waiters), a read this often besides
POLL_S = 20.0  # a retrieve waits this long for its answer before saying try_again (the SDK waits 45 s)
KEPT_S = 3600.0  # an answer is kept this long after it is ready
PENDING_PER_KEY = 256
FUSED_KEYS = 8  # keys whose forward_backward calls one step may take together
ANSWERED = object()  # a call's lane turn, once a step of another key's answered it


@dataclass
class Failed:
    """What a call's turn ended with when it failed (returned, not raised: the lane's own failures are told apart)."""

    exc: BaseException


@dataclass(frozen=True)
class Fusing:
    """How calls of one kind run as one step: ``run`` (several calls' arguments -> each one's answer or exception, in
    order), ``size`` (a call's arguments -> its size, tokens) and ``budget`` (the most a step's calls may hold in
    all)."""

    run: Callable[[list[tuple]], list]
    size: Callable[[tuple], int]
    budget: int


@dataclass
class Pending:
    owner: str | None
    kind: str
    done: asyncio.Event = field(default_factory=asyncio.Event)
    answer: bytes | dict | None = None
    error: tuple[str, str] | None = None  # (message, category: "user" or "server")
    ended: float | None = None
    task: asyncio.Task | None = None  # held here: the loop keeps only a weak reference to a task
    fusable: tuple | None = None  # a call's own arguments when it may join another call's turn (Futures.fuse)
    started: bool = False  # taken by its own turn or by another key's step (under Futures.guard)
    rid: str = ""  # its request id
    call: tuple | None = None  # (fn, args): what its turn runs
    size: int | None = None  # its size as its kind's Fusing counts it, once asked


class Futures:
    def __init__(self, lane, fuse: dict[str, Fusing] | None = None,
                 shared: Shared | None = None, runner: Callable | None = None):
        """``fuse``: by kind of call, how several such calls run as one step (:class:`Fusing`);
        ``shared``: where futures are written for the other replicas (none: this replica's memory only);
        ``runner(fn, *args)``: where a call's turn runs, from the lane's thread (the engine's thread: its torch work on
        the engine's every core; None: the lane's thread)."""
        self.lane, self.fuse, self.shared = lane, fuse or {}, shared
        self.runner = runner or (lambda fn, *args: fn(*args))
        self.items: dict[str, Pending] = {}
        self.waiting: dict[str | None, deque[Pending]] = {}  # each key's calls not taken yet, in its order
        self.guard = threading.Lock()  # the waiting calls, read by the lane's thread
        self.fused_steps = 0  # forward_backward steps that took calls of more than one key
        self.turns_between = 0  # calls run between two passes of another key's call
        self.busy: frozenset | None = None  # the keys whose calls run in the step now (its thread: the lane's)
        self.loop: asyncio.AbstractEventLoop | None = None

    def submit(self, owner: str | None, kind: str, fn, *args, fusable: bool = False, rid: str | None = None) -> str:
        """``fn(*args)`` queued in the lane as ``owner``'s work (``fusable``: a forward_backward, whose ``args`` may
        join a step of several keys); its request id (``rid``: a logged call's, its row in the store already)."""
        pending = self._new(owner, kind, rid, fusable=args if fusable else None, call=(fn, args))
        with self.guard:
            self.waiting.setdefault(owner, deque()).append(pending)
        pending.task = asyncio.ensure_future(self._run(pending, fn, args))
        return pending.rid

    def start(self, owner: str | None, kind: str, work: Callable[[], Awaitable]) -> str:
        """``await work()`` run now on the event loop as ``owner``'s call, outside the lane: a sample, whose rows the
        inference engine shares among keys itself, and which changes nothing a key's training calls read (so it need
        not wait for them); its request id."""
        pending = self._new(owner, kind, None)
        pending.task = asyncio.ensure_future(self._awaited(pending, work))
        return pending.rid

    def _new(self, owner: str | None, kind: str, rid: str | None, **fields) -> Pending:
        """A new future of ``owner``'s, or a 429 when the key has :data:`PENDING_PER_KEY` waiting here (a logged
        call's, ``rid``, was counted in the store when it was logged)."""
        self._prune()
        self.loop = asyncio.get_running_loop()
        waiting = sum(1 for p in self.items.values() if p.owner == owner and not p.done.is_set())
        if rid is None and waiting >= PENDING_PER_KEY:
            raise APIError(429, f"This API key has {waiting} Tinker calls waiting (at most {PENDING_PER_KEY}); retry "
                           "shortly.", type_="requests", code="rate_limit_exceeded", headers={"retry-after": "1"})
        rid = rid or new_id("req")
        self.items[rid] = Pending(owner, kind, rid=rid, **fields)
        return self.items[rid]

    async def _awaited(self, pending: Pending, work) -> None:
        try:
            answer = await work()
        except Exception as exc:  # noqa: BLE001 - said in its future
            answer = exc
        finally:
            pending.task = None
        self._settle(pending, answer)

    async def recorded(self, rid: str) -> None:
        """The future's row written in the store (before its id is answered: any replica then finds it)."""
        pending = self.items.get(rid)
        if self.shared is not None and pending is not None:
            await self.shared.add(rid, pending)

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
        """The call's turn in the lane (its thread): run it, with the waiting calls that join it (:meth:`_joining`)
        when its kind is fused; :data:`ANSWERED` when another call's turn has answered it already."""
        with self.guard:
            if not self._take(pending):
                return ANSWERED
            fuse, joined = self._joined(pending)
        self.busy = frozenset({pending.owner, *(p.owner for p in joined)})
        try:
            return self.runner(self._step, pending, fn, args, fuse, joined)
        finally:
            self.busy = None

    def others_turn(self) -> bool:
        """Called by a long call between two of its passes or layers (in the lane's thread): the call at the head of
        each other key's waiting calls runs now (with the calls that join it, as in its own turn), one a key, keys in
        turn, and is answered; its own turn, when it comes, has nothing left to do. The calls of the keys whose calls
        run in the step wait for it (each key's order holds: a key's optim_step never runs inside the step that
        computes its gradients); a call run so gives no turns itself (one level). Whether any call ran."""
        busy = self.busy
        if busy is None or not self.waiting:
            return False
        with self.guard:
            turns = []
            for owner, queue in list(self.waiting.items()):
                head = queue[0] if queue else None
                if owner in busy or head is None or head.started:
                    continue
                self._take(head)
                turns.append((head, *self._joined(head, busy)))
        self.busy = None
        try:
            for head, fuse, joined in turns:
                self.turns_between += 1
                fn, args = head.call
                answer = self._step(head, fn, args, fuse, joined)
                self.loop.call_soon_threadsafe(self._settle, head, answer.exc if isinstance(answer, Failed) else answer)
        finally:
            self.busy = busy
        return bool(turns)

    def _joined(self, pending: Pending, waits: frozenset = frozenset()) -> tuple:
        """Under :attr:`guard`, ``pending`` taken: what runs its kind as one with others (None: it runs alone) and the
        waiting calls that join it (:meth:`_joining`)."""
        fuse = self.fuse.get(pending.kind) if pending.fusable is not None else None
        return fuse, ([] if fuse is None else self._joining(pending, waits))

    def _step(self, pending: Pending, fn, args, fuse, joined: list[Pending]):
        """The call (with the calls that joined it, run as one by ``fuse``): its answer, or :class:`Failed`."""
        if not joined:
            try:
                return fn(*args)
            except Exception as exc:  # noqa: BLE001 - said in its future
                return Failed(exc)
        self.fused_steps += 1
        try:
            answers = fuse.run([pending.fusable] + [p.fusable for p in joined])
        except Exception as exc:  # noqa: BLE001 - every call of the step ends with it
            answers = [exc] * (1 + len(joined))
        for other, answer in zip(joined, answers[1:], strict=True):
            self.loop.call_soon_threadsafe(self._settle, other, answer)
        return Failed(answers[0]) if isinstance(answers[0], BaseException) else answers[0]

    def _joining(self, pending: Pending, waits: frozenset = frozenset()) -> list[Pending]:
        """Under :attr:`guard`: the waiting calls that join ``pending``'s turn, taken: the fusable call of its kind at
        the head of each other key's calls, up to :data:`FUSED_KEYS` keys, while the step's calls fit its kind's
        budget. The calls of the keys ``waits`` (whose calls run in a step now) are left to wait for it."""
        fusing = self.fuse[pending.kind]
        joined: list[Pending] = []
        for owner, queue in list(self.waiting.items()):  # (a queue emptied by a take is removed from waiting)
            head = queue[0]
            if len(joined) + 1 < FUSED_KEYS and head.kind == pending.kind and head.fusable is not None \
                    and head.owner != pending.owner and owner not in waits \
                    and sum(self._size(p, fusing) for p in (pending, *joined, head)) <= fusing.budget:
                self._take(head)
                joined.append(head)
        return joined

    @staticmethod
    def _size(pending: Pending, fusing: Fusing) -> int:
        """The call's size, counted once, and only when a call of another key could join it."""
        if pending.size is None:
            pending.size = fusing.size(pending.fusable)
        return pending.size

    def _settle(self, pending: Pending, answer) -> None:
        """The call's answer, or the failure the caller reads from its future (on the event loop)."""
        from tunesmith.serve.tinker.losses import TrainingError
        from tunesmith.serve.tinker.wire import WireError

        if isinstance(answer, APIError) and answer.status >= 500:  # the engine's own failure (a 503 while closing)
            pending.error = (answer.body["message"], "server")
        elif isinstance(answer, (TrainingError, WireError, APIError)):
            pending.error = (answer.body["message"] if isinstance(answer, APIError) else str(answer), "user")
        elif isinstance(answer, BaseException):
            log.error("Tinker %s failed", pending.kind, exc_info=answer)
            pending.error = (f"The server failed on this {pending.kind}: {type(answer).__name__}: {answer}", "server")
        else:
            pending.answer = answer
        pending.ended = time.monotonic()
        pending.done.set()
        if self.shared is not None:
            self.shared.end(pending)

    async def retrieve(self, rid: str, owner: str | None) -> Pending | None:
        """The future once it has ended, or None while it still runs after :data:`POLL_S`; a 404 when it is not
        this key's (or not known here)."""
        pending = self.items.get(rid)
        if pending is None and self.shared is not None:
            return await self.shared.retrieve(rid, owner)
        if pending is None or pending.owner != owner:
            raise APIError(404, f"No future {rid!r} on this server for this key (futures are kept {KEPT_S:.0f} s "
                           "after they end).", code="not_found")
        try:
            await asyncio.wait_for(pending.done.wait(), POLL_S)
        except TimeoutError:
            return None
        return pending

    def _prune(self) -> None:
        now = time.monotonic()
        for rid in [r for r, p in self.items.items() if p.ended is not None and now - p.ended > KEPT_S]:
            del self.items[rid]
        if self.shared is not None:
            self.shared.prune()


class Shared:
    """Futures in the store (``tinker_futures``) and their answers on the shared data folder, for every replica.
    Store work runs in the store lane, as the key's; an answer is written when its future ends, without holding up
    the replica that answers it from memory."""

    def __init__(self, store, lane, root: Path, holder: str):
        """``root``: the Tinker API's folder on the shared data folder (answers in ``futures/``, logged calls' bodies
        in ``commands/``: :mod:`tunesmith.serve.tinker.commands`)."""
        self.store, self.lane, self.holder = store, lane, holder
        self.folder, self.bodies = root / "futures", root / "commands"
        self.presence = None  # this replica's claim in tinker_replicas, taken at its first future
        self.pruned = 0.0
        self.writes: set[asyncio.Task] = set()
        self.listener = None  # the store's notifications (PostgreSQL's LISTEN), once listen() ran
        self.awaited: dict[str, asyncio.Event] = {}  # futures another replica runs, awaited here: set when they end
        self.on_logged: Callable[[str | None], None] = lambda run_id: None

    def listen(self, on_logged: Callable[[str | None], None]) -> None:
        """On the event loop: the store's notifications heard from now on. A future's end wakes whoever awaits it
        here; a call logged calls ``on_logged(run_id)`` (``None``: some may have been missed)."""
        loop = asyncio.get_running_loop()
        self.on_logged = on_logged
        self.listener = self.store.listen(lambda channel, payload: loop.call_soon_threadsafe(self._heard, channel,
                                                                                             payload))

    def listening(self) -> bool:
        return self.listener is not None and self.listener.alive.is_set()

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()

    def _heard(self, channel: str | None, payload: str | None) -> None:
        from tunesmith.serve.tinker.store import ENDED, LOGGED

        if channel in (None, ENDED):
            for rid in [payload] if channel else list(self.awaited):
                event = self.awaited.pop(rid, None)
                if event is not None:
                    event.set()
        if channel in (None, LOGGED):
            self.on_logged(payload)

    def present(self):
        if self.presence is None or self.presence.lost.is_set():
            self.presence = self.store.present(self.holder)
        return self.presence

    async def add(self, rid: str, pending: Pending) -> None:
        await self.lane.run(pending.owner, lambda: self.store.add_future(rid, pending.owner, pending.kind,
                                                                         self.present()), always=True)

    def end(self, pending: Pending) -> None:
        task = asyncio.ensure_future(self.lane.run(pending.owner, self._write_end, pending, always=True))
        self.writes.add(task)
        task.add_done_callback(self._written)

    def _written(self, task: asyncio.Task) -> None:
        self.writes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("a Tinker future's end was not written to the store: %s", task.exception())

    def _write_end(self, pending: Pending) -> None:
        kind = file = None
        if pending.error is None:
            kind = "proto" if isinstance(pending.answer, bytes) else "json"
            data = pending.answer if kind == "proto" else json.dumps(pending.answer).encode()
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / pending.rid
            staging = path.with_name(f".{pending.rid}.tmp")
            staging.write_bytes(data)
            staging.replace(path)
            file = str(path)
        self.store.end_future(pending.rid, pending.owner, pending.kind, self.present(), pending.error, kind, file)

    async def retrieve(self, rid: str, owner: str | None) -> Pending | None:
        """A future another replica took: its end read from the store within :data:`POLL_S` (None: still running);
        a 404 when the key has none of that id, an error when the replica that took it stopped first."""
        deadline = time.monotonic() + POLL_S
        try:
            return await self._retrieved(rid, owner, deadline)
        finally:
            self.awaited.pop(rid, None)

    async def _retrieved(self, rid: str, owner: str | None, deadline: float) -> Pending | None:
        while True:
            ended = self.awaited.setdefault(rid, asyncio.Event())  # before the read: an end heard during it counts
            row = await self.lane.run(owner, self.store.future, rid, owner)
            if row is None:
                raise APIError(404, f"No future {rid!r} on this server for this key (futures are kept "
                               f"{KEPT_S:.0f} s after they end).", code="not_found")
            if row["ended_at"] is not None:
                return await self.lane.run(owner, self._read_end, row)
            if row["holder_gone"] and not row["logged"]:  # a logged call is answered by the run's taker
                return Pending(owner, row["kind"], error=(
                    f"The replica that took this {row['kind']} stopped before answering it; call again (a training "
                    "call: from the run's last saved state, create_training_client_from_state_with_optimizer).",
                    "server"))
            if time.monotonic() > deadline:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), HEARD_POLL_S if self.listening() else REMOTE_POLL_S)

    def _read_end(self, row: dict) -> Pending:
        if row["error"] is not None:
            return Pending(row["owner"], row["kind"], error=(row["error"], row["category"]))
        data = Path(row["answer_file"]).read_bytes()
        return Pending(row["owner"], row["kind"], answer=data if row["answer_kind"] == "proto" else json.loads(data))

    def prune(self) -> None:
        """At most every minute, in the store lane: futures ended :data:`KEPT_S` ago, files then rows."""
        now = time.time()
        if now - self.pruned < 60:
            return
        self.pruned = now

        def pruned():
            gone = self.store.expired_futures(now - KEPT_S)
            for row in gone:
                if row["answer_file"]:
                    Path(row["answer_file"]).unlink(missing_ok=True)
                (self.bodies / row["id"]).unlink(missing_ok=True)  # a logged call's body never read
            self.store.forget_futures([r["id"] for r in gone])

        task = asyncio.ensure_future(self.lane.run(None, pruned, always=True))
        self.writes.add(task)
        task.add_done_callback(self._written)
