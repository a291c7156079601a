"""Any replica takes any training call (replicas on PostgreSQL): a run's calls go through the store's per-run command
log, so that a client behind a per-request round robin trains as it would on one server.

- **The log.** A run's call (forward_backward, optim_step, save_weights, save_weights_for_sampler, load_weights) is
  written to ``tinker_commands`` by whichever replica it reached, keyed by the run and the SDK's ``seq_id``, with its
  future's row, before its id is answered. A retry of a logged ``seq_id`` (the SDK's, after a cut connection) is the
  same call: answered with the first one's future, never applied twice. A forward_backward's body waits as a file on
  the shared data folder until the holder reads it.
- **The holder** (the replica whose claim of the run's row holds) reads its runs' calls not answered yet as soon as
  one is logged (it hears the store's notification: PostgreSQL's ``LISTEN``; every :data:`POLL_S` while it cannot)
  and queues them in its ``tinker`` lane in ``seq_id`` order. The
  SDK sends a run's calls one after another, each once the previous one has its future, so that order is the client's.
  Each answer is written to the store (:class:`tunesmith.serve.tinker.futures.Shared`) and reaches the client through
  whichever replica it polls.
- **Saves.** After an ``optim_step``, the holder saves the run's state (adapter and AdamW moments) as its checkpoint
  ``tinker://<run>/weights/autosave`` when its last save is ``--tinker-autosave`` seconds old (60 by default): a
  holder's death costs at most that much of the run's steps.
- **Takeover.** Every :data:`TAKE_S` each replica looks for runs with calls waiting that nobody holds (the holder was
  killed or cut off and its claim ran out, or it let the run go). One of them takes the run's claim, loads its newest
  save, and answers each of its calls with an error naming that save's step and path, until the client loads a state
  (``load_state_with_optimizer``): never a hang, and never a step applied to a state the client did not expect.
  A run that cannot be restored there (its key's memory quota) has its waiting calls answered with why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from tunesmith.serve.errors import APIError
from tunesmith.serve.store import new_id
from tunesmith.serve.tinker.futures import PENDING_PER_KEY, Shared
from tunesmith.serve.tinker.store import TooManyCommands, run_session

log = logging.getLogger("tunesmith.serve")
POLL_S = 0.05  # how often a holder reads its runs' calls logged by other replicas while it hears no notifications
TAKE_S = 1.0  # how often a replica looks for runs with calls waiting that nobody holds
WAITING_BYTES = 256 * 2**20  # the forward_backward bodies of one key's logged calls waiting, at most (on the disk)


class Commands:
    """The command log of one replica's Tinker API (:class:`tunesmith.serve.tinker.service.Tinker`): logging calls,
    queueing its runs' calls in order, and taking over runs whose holder stopped."""

    def __init__(self, tinker, shared: Shared):
        self.tinker, self.shared, self.store = tinker, shared, tinker.store
        self.folder = shared.bodies  # forward_backward bodies until their holder reads them
        self.queued: set[str] = set()  # future ids of logged calls queued here, not answered in the store yet
        self.wake: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.looked = 0.0  # when runs nobody holds were last looked for (time.monotonic())

    def start(self) -> None:
        """The loop that queues this replica's runs' calls and takes over runs nobody holds (on the event loop)."""
        self.wake = asyncio.Event()
        self.task = asyncio.ensure_future(self._loop())
        self.shared.listen(self._logged)

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.shared.close()

    def _logged(self, run_id: str | None) -> None:
        """A call logged by any replica (heard from the store): read at once when its run is held here."""
        if run_id is None or run_id in self.tinker.claims:
            self.wake.set()

    def body_path(self, rid: str) -> Path:
        return self.folder / rid

    async def log(self, owner, run_id: str, seq: int | None, kind: str, args: list, body: bytes | None = None) -> str:
        """The call written to the run's log (a 429 when the key has :data:`PENDING_PER_KEY` logged calls waiting, or
        :data:`WAITING_BYTES` of their bodies); the id of the future that answers it."""
        rid = new_id("req")

        def logged() -> str:
            if body is not None:
                self.folder.mkdir(parents=True, exist_ok=True)
                staging = self.folder / f".{rid}.tmp"
                staging.write_bytes(body)
                staging.replace(self.body_path(rid))
            answer = None
            try:
                answer = self.store.log_command(run_id, seq, rid, owner, kind, args, len(body or b""),
                                                self.shared.present(), PENDING_PER_KEY, WAITING_BYTES)
            except TooManyCommands as exc:
                raise APIError(429, f"This API key has {exc.args[0]} Tinker calls waiting, their data "
                               f"{exc.args[1] / 2**20:.0f} MiB (at most {PENDING_PER_KEY} calls, "
                               f"{WAITING_BYTES / 2**20:.0f} MiB); retry shortly.", type_="requests",
                               code="rate_limit_exceeded", headers={"retry-after": "1"}) from None
            finally:
                if answer != rid:  # refused, or a retry of a call logged before: this body is not needed
                    self.body_path(rid).unlink(missing_ok=True)
            return answer

        answer = await self.shared.lane.run(owner, logged, always=True)
        self.wake.set()
        return answer

    async def _loop(self) -> None:
        while True:
            try:
                fast = self.tinker.claims and not self.shared.listening()  # else a logged call wakes it
                await asyncio.wait_for(self.wake.wait(), POLL_S if fast else TAKE_S)
            except TimeoutError:
                pass
            self.wake.clear()
            try:
                await self._queue_logged()
                if time.monotonic() - self.looked >= TAKE_S:
                    self.looked = time.monotonic()
                    await self._let_go_closed()
                    await self._take_orphans()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the store failing: tried again in a moment
                log.warning("the Tinker command log could not be read: %s: %s", type(exc).__name__, exc)
                await asyncio.sleep(TAKE_S)

    async def _queue_logged(self) -> None:
        """The calls of the runs held here that were logged since the last look, queued in the lane in order."""
        held = list(self.tinker.claims)
        if not held:
            self.queued.clear()
            return
        rows = await self.shared.lane.run(None, self.store.logged, held, always=True)
        self.queued &= {r["rid"] for r in rows}  # the rest were answered
        new = [r for r in rows if r["rid"] not in self.queued]
        if not new:
            return
        bodies = await self.shared.lane.run(None, self._bodies, [r["rid"] for r in new if r["kind"] ==
                                                                 "forward_backward"], always=True)
        for row in new:
            if row["run_id"] not in self.tinker.claims:  # let go meanwhile: its calls wait for a taker
                continue
            self.queued.add(row["rid"])
            fn, args = self.tinker.call_of(row["kind"], row["owner"], row["run_id"], row["args"],
                                           bodies.get(row["rid"]))
            self.tinker.futures.submit(row["owner"], row["kind"], fn, *args, rid=row["rid"],
                                       fusable=row["kind"] == "forward_backward")

    def _bodies(self, rids: list[str]) -> dict[str, bytes | None]:
        """The forward_backward bodies of ``rids``, read and removed (None for one gone: its call says so)."""
        found: dict[str, bytes | None] = {}
        for rid in rids:
            path = self.body_path(rid)
            try:
                found[rid] = path.read_bytes()
            except FileNotFoundError:
                found[rid] = None
            path.unlink(missing_ok=True)
        return found

    async def _let_go_closed(self) -> None:
        """The runs held here whose client session was closed (through any replica) let go, their waiting calls
        answered with why."""
        held = list(self.tinker.owners.items())
        closed = await self.shared.lane.run(None, self.store.finished_sessions, {run_session(r) for r, _ in held},
                                            always=True)
        for run_id, owner in held:
            if run_session(run_id) in closed:
                await self.tinker.futures.lane.run(owner, self.tinker.let_go, run_id, always=True)
                await self.shared.lane.run(owner, self._fail, run_id, closed_message(run_id), always=True)

    async def _take_orphans(self) -> None:
        """Each run with calls waiting that nobody holds, taken over here unless another replica is first (the
        calls of a run whose client session was closed are answered with that)."""
        orphans = await self.shared.lane.run(None, self.store.orphaned, always=True)
        closed = await self.shared.lane.run(None, self.store.finished_sessions,
                                            {run_session(r["id"]) for r in orphans}, always=True)
        for row in orphans:
            run_id, owner = row["id"], row["owner"]
            if run_session(run_id) in closed:
                await self.shared.lane.run(owner, self._fail, run_id, closed_message(run_id), always=True)
                continue
            try:
                await self.tinker.futures.lane.run(owner, self.tinker.take_over, run_id, owner, always=True)
            except Exception as exc:  # noqa: BLE001 - said to each waiting call, never left waiting
                log.warning("Tinker run %s could not be taken over here: %s", run_id, exc)
                message = (f"The replica that held training run {run_id} stopped, and the run could not be restored "
                           f"on another: {exc}")
                await self.shared.lane.run(owner, self._fail, run_id, message, always=True)
            self.wake.set()

    def _fail(self, run_id: str, message: str) -> None:
        """Every call of the run waiting in its log answered with ``message``."""
        for row in self.store.logged([run_id]):
            self.store.end_future(row["rid"], row["owner"], row["kind"], self.shared.present(), (message, "user"),
                                  None, None)
            self.body_path(row["rid"]).unlink(missing_ok=True)


def closed_message(run_id: str) -> str:
    return (f"training run {run_id}: its client session was closed (ServiceClient.close), so its runs were let go; "
            "create a training client from its last saved state in a new ServiceClient")
