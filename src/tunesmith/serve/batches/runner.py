"""The batch runner: one task in each server (each replica sharing a store) answering batches chunk by chunk.

A batch's requests are split into chunks of ``chunk_lines`` lines when it starts (:mod:`tunesmith.serve.batches.store`,
``batch_chunks``). Each replica's runner claims chunks as jobs are claimed (:mod:`tunesmith.serve.store.claims`: a
generation in database time, renewed by the process's heartbeat; a claim lost cancels its work): replicas on one
PostgreSQL and one data folder answer the chunks of one batch side by side, each line once, and a chunk whose
replica stopped or died is taken over (once its claim is let go or has run out) from its recorded lines. On SQLite,
the embedded default, the one server runs every chunk.

Each request goes through the server's own route for its URL, in process (an ASGI call, no socket), as its batch's
owner: the same checks, plan, engine and answer shape as a client's request. Its rows are the key's own *background*
rows in the engine (:mod:`tunesmith.serve.engines.shares`): they count in the key's share of every step, after every
interactive row. On one replica a key starts the lines of one chunk at a time (of its oldest batch with a chunk no
replica holds; its later batches wait, ``validating``), at most ``concurrency`` of its lines in flight; once a chunk
has started its last line the key's next chunk is claimed, so its lines keep flowing while the chunk's last ones end.

Nothing of a batch is held whole, in memory or in the store: a chunk's input is read a few lines at a time, off the
event loop (the files lane), and each answer is appended to the chunk's part file (output or error) as it comes, its
line number, status and the part files' lengths recorded in one transaction fenced by the chunk's claim. The part
files are the claim's generation's own: a chunk taken over starts its new part files from the recorded lengths of the
last generation that recorded a line, and goes on from its unanswered lines; a replica frozen past its lease appends
to files no other reads and records nothing. When nothing is left to answer, the replica that decides it
first (one transaction per batch) assembles the batch's output and error files from the parts in chunk order, off the
event loop, keeps them as the batch's files and gives the batch its final status. ``cancel`` stops starting lines
within seconds on every replica (the one asked at once, the others at their next look) and cancels those in flight;
what finished is kept. Past its completion window a batch ``expired`` with the lines it answered. A stop (SIGTERM)
starts no line and records none it cut short: the batch stays in progress and its chunks are let go.

A batch an earlier version left in progress (its answered lines recorded, its answers in one output and one error
file of the whole batch) goes on by chunks: the lines it answered are skipped, and its files come first in the
assembled ones. Nothing is rewritten when the new version starts: the first replica to run it splits it.

The runner's own store work (its look every two seconds, claims, changes of status) runs in a thread, never on the
event loop: a slow store must not stall every key's requests. It is not the store lane's (a key's requests'): it must
run while the server stops, after the lanes have closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from tunesmith.serve.api.auth import OWNER_SCOPE
from tunesmith.serve.batches.output import BatchFiles, InputLines, assemble, chunk_bounds, failure_body, remove_parts
from tunesmith.serve.batches.store import CHUNKED, BatchStore
from tunesmith.serve.jobs.routes import expire_file
from tunesmith.serve.store.claims import Claim, ClaimLost
from tunesmith.serve.store.database import log_failure, transient

log = logging.getLogger("tunesmith.serve")
BATCH_SCOPE = "tunesmith.batch"  # set on a batch line's ASGI scope: the routes skip key limits, rows in the background
CHUNK_LINES = 256  # a batch's requests claimed together by one replica
READ_AHEAD = 64  # input lines read at a time


@dataclass(eq=False)
class Work:
    """A chunk this replica answers, or (``chunk`` None) a batch it splits into chunks under the batch's claim."""

    batch: dict
    claim: Claim
    chunk: dict | None = None
    task: asyncio.Task | None = None
    starting: bool = True  # still starting lines: the key's next chunk waits


@dataclass
class Turn:
    """What one look at the store found: work lost to another replica, batches to stop here, work to start."""

    lost: list[Work] = field(default_factory=list)
    stop: set[str] = field(default_factory=set)
    started: list[Work] = field(default_factory=list)
    finishing: list[tuple[dict, str, list[dict], Claim]] = field(default_factory=list)
    active: set[str] = field(default_factory=set)


class BatchRunner:
    def __init__(self, app, concurrency: int, chunk_lines: int | None = None):
        self.app, self.concurrency, self.chunk_lines = app, concurrency, chunk_lines or CHUNK_LINES
        self.cancelled: set[str] = set()
        self.in_flight: dict[str, set[asyncio.Task]] = {}
        self.work: list[Work] = []
        self.finishing: dict[str, tuple[str | None, asyncio.Task]] = {}  # batch id: (its key, the task)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.gates: dict[str | None, asyncio.Semaphore] = {}  # a key's lines in flight on this replica
        self.event: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.stopping = False

    def start(self) -> None:
        self.event = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.ensure_future(self._loop())

    def stop(self) -> None:
        self.stopping = True  # what fails from here on is the server stopping (its lanes closed), not the batch
        if self.task is not None:
            self.task.cancel()

    def wake(self) -> None:
        if self.event is not None:
            self.event.set()

    def _watch(self, work: Work) -> Work:
        """The work's task cancelled as soon as its claim is lost (from the heartbeat's thread)."""
        def lost(_reason: str) -> None:
            if work.task is not None and self.loop is not None:
                self.loop.call_soon_threadsafe(work.task.cancel)
        work.claim.on_lost(lost)
        return work

    def cancel(self, batch_id: str) -> None:
        self.cancelled.add(batch_id)
        for task in self.in_flight.get(batch_id, ()):
            task.cancel()
        self.wake()

    @property
    def batches(self) -> BatchStore:
        return BatchStore(self.app.state.store)

    @property
    def files_lane(self):
        return self.app.state.lanes.files

    @property
    def me(self) -> str:
        return self.app.state.replica

    async def _loop(self) -> None:
        """Every turn: this replica's claims renewed, then each key's next chunk claimed (one key's chunks one after
        another, different keys' side by side: the engine shares each step over keys) and each batch with nothing
        left to answer finished, by whichever replica decides it first."""
        try:
            while True:
                self.work = [w for w in self.work if w.task is None or not w.task.done()]
                self.event.clear()  # a wake from here on is seen at the next turn
                finishing = {bid: owner for bid, (owner, _) in self.finishing.items()}
                try:
                    turn = await asyncio.to_thread(self._scan, list(self.work), finishing, set(self.cancelled))
                except Exception as exc:  # noqa: BLE001 - the store unreachable for a while: the next turn looks again
                    log_failure(log, "batch runner: the look at the store failed", exc)
                    turn = Turn(active=set(self.cancelled) | {w.batch["id"] for w in self.work})
                for work in turn.lost:
                    work.task.cancel()  # another replica took it over: this one's lease had run out
                for bid in turn.stop:
                    self.cancel(bid)  # cancelled through another replica, or ended there
                self.cancelled &= turn.active | {w.batch["id"] for w in self.work}
                for work in turn.started:
                    self.work.append(work)
                    work.task = asyncio.ensure_future(self._guarded(work))
                    self._watch(work)
                for batch, status, chunks, claim in turn.finishing:
                    self._finish_soon(batch, status, chunks, claim)
                try:
                    await asyncio.wait_for(self.event.wait(), 2.0)
                except TimeoutError:
                    pass
        finally:
            for task in [*(w.task for w in self.work if w.task), *(t for _, t in self.finishing.values())]:
                task.cancel()

    def _scan(self, work: list[Work], finishing: dict[str, str | None], cancelled: set[str]) -> Turn:
        """One look at the store from a thread: this replica's lost claims (the heartbeat renews the others), then the
        work to start, each claimed by this replica: a key's next chunk once its chunk here has
        started its last line, of the same batch, or of its next batch once no other batch of the key runs or
        finishes here. Once the server stops, nothing is claimed (what was claimed meanwhile is let go: no replica
        waits out the lease of work that never started)."""
        batches, me, now, turn = self.batches, self.me, time.time(), Turn()
        claims = self.app.state.store.claims
        turn.lost = [w for w in work if w.claim.lost.is_set()]
        active = batches.active()
        turn.active = {b["id"] for b in active}
        status = {b["id"]: b["status"] for b in active}
        turn.stop = {w.batch["id"] for w in work if status.get(w.batch["id"], "ended") in ("cancelling", "ended")}
        starting = {w.batch["owner"] for w in work if w.starting and w not in turn.lost}
        here: dict[str | None, set[str]] = {}  # a key's batches this replica runs or finishes
        for owner, bid in [*((w.batch["owner"], w.batch["id"]) for w in work), *((o, b) for b, o in finishing.items())]:
            here.setdefault(owner, set()).add(bid)

        def waits(owner: str | None, bid: str) -> bool:
            return owner in starting or bool(here.get(owner, set()) - {bid})

        def take(owner: str | None, bid: str) -> None:
            starting.add(owner)
            here.setdefault(owner, set()).add(bid)

        states = batches.chunk_states([b["id"] for b in active if b["claim_status"] == CHUNKED])
        for batch in active:
            bid, owner = batch["id"], batch["owner"]
            ended = _ended(batch, cancelled, now)
            if batch["claim_status"] != CHUNKED:  # to split (a new batch, or one an earlier version left)
                if bid in here.get(owner, ()) or (waits(owner, bid) and not ended):
                    continue
                claim = batches.claim_batch(bid, me)
                if claim is not None:
                    turn.started.append(Work(batch, claim))
                    if not ended:  # a batch that only ends is finished at once, beside the key's chunk
                        take(owner, bid)
                continue
            pending, held = states[bid]
            if bid not in finishing and not held and (ended or not pending):
                decided = batches.begin_finishing(bid, me)
                if decided is not None:
                    turn.finishing.append((batch, *decided))
                    continue
            if ended or waits(owner, bid) or batch["status"] != "in_progress" or not pending:
                continue
            claimed = batches.claim_chunk(bid, me)
            if claimed is not None:
                turn.started.append(Work(batch, claimed[1], claimed[0]))
                take(owner, bid)
        if self.stopping:
            for w in turn.started:
                claims.let_go(w.claim)
            for *_, claim in turn.finishing:
                claims.let_go(claim)
            return Turn(lost=turn.lost, active=turn.active)
        return turn

    async def _guarded(self, work: Work) -> None:
        bid = work.batch["id"]
        try:
            if work.chunk is None:
                await self._split(work)
            else:
                await self._answer(work)
        except asyncio.CancelledError:
            raise
        except ClaimLost as lost:  # another replica goes on from the recorded lines
            log.info("batch %s: %s", bid, lost)
        except Exception as exc:  # noqa: BLE001 - the batch fails with the reason; the runner goes on
            if self.stopping or transient(exc):  # stays in progress: the next holder goes on from its recorded lines
                log.info("batch %s stopped here (%s); it goes on from its recorded lines", bid, exc)
                return
            log.exception("batch %s failed", bid)
            try:
                await asyncio.to_thread(self.batches.fail, bid, [{"code": "batch_failed", "message": str(exc)[:500]}],
                                        work.claim)
            except ClaimLost:
                log.info("batch %s: its claim was lost; its next holder goes on", bid)
        finally:
            work.starting = False
            decided = await asyncio.shield(asyncio.to_thread(self._let_go, work))
            if decided is not None:
                self._finish_soon(work.batch, *decided)
            if work in self.work:  # after its finishing is known: the key's next batch waits for it
                self.work.remove(work)
            if not any(w.batch["owner"] == work.batch["owner"] for w in self.work):
                self.gates.pop(work.batch["owner"], None)
            self.wake()  # the key's next chunk may start

    def _let_go(self, work: Work) -> tuple[str, list[dict], Claim] | None:
        """The work's claim let go; after a chunk, the batch's finishing, if this replica decides it now."""
        self.app.state.store.claims.let_go(work.claim)
        if work.chunk is None or self.stopping:
            return None
        try:
            return self.batches.begin_finishing(work.batch["id"], self.me)
        except Exception:  # noqa: BLE001 - the store unreachable: the loop's next look decides it
            log.warning("batch %s: its finishing is decided at the next look", work.batch["id"], exc_info=True)
            return None

    async def _split(self, work: Work) -> None:
        """The batch split into chunks under its claim (an earlier version's files cut back to their recorded lengths
        first); one with nothing left to answer (cancelled, past its window) is finished here instead."""
        batch = work.batch
        bid, owner = batch["id"], batch["owner"]
        await self.files_lane.run(owner, self._head_as_recorded, batch, always=True)
        bounds = []
        if not _ended(batch, self.cancelled, time.time()):
            path = await self._input(work)
            if path is None:
                return
            bounds = await self.files_lane.run(owner, chunk_bounds, path, self.chunk_lines, always=True)
        if bounds:
            await asyncio.to_thread(self.batches.add_chunks, bid, bounds, work.claim)
            return
        if batch["status"] != "finalizing":
            await asyncio.to_thread(work.claim.write, self.batches.mark, bid, "finalizing")
        status = await asyncio.to_thread(work.claim.read, self.batches.final_status, bid)
        await self._finish(batch, status, [], work.claim)

    async def _input(self, work: Work) -> str | None:
        """The path of the batch's input file; None when it was deleted (the batch failed, saying so)."""
        batch = work.batch
        f = await asyncio.to_thread(work.claim.read, self.app.state.store.get_file, batch["input_file_id"],
                                    batch["owner"])
        if f is None:
            await asyncio.to_thread(self.batches.fail, batch["id"], [{
                "code": "input_file_deleted", "param": "input_file_id",
                "message": f"the input file {batch['input_file_id']} was deleted"}], work.claim)
            return None
        return f["storage"]

    def _head_as_recorded(self, batch: dict) -> None:
        """The whole batch's files an earlier version wrote, cut back to their recorded lengths; answers a still
        earlier version kept in the store are written out to them first."""
        files = BatchFiles(self.app.state.store.root, batch["id"])
        files.cut_to(batch["output_bytes"], batch["error_bytes"])
        stored = self.batches.stored_answers(batch["id"])
        if stored and not batch["output_bytes"] and not batch["error_bytes"]:
            for row in stored:
                sizes = files.append(row["custom_id"], row["status_code"], row["body"].encode())
                self.batches.add_result(batch["id"], row["line"], row["custom_id"], row["status_code"], *sizes)

    def _chunk_as_recorded(self, chunk: dict, files: BatchFiles) -> set[int]:
        """The part files of this claim's generation started from what the chunk recorded (the recorded lengths of the
        part files of the generation that recorded its last line); returns its lines answered."""
        before = BatchFiles(self.app.state.store.root, chunk["batch_id"], chunk["chunk"], chunk["parts_generation"])
        files.start_from(before, chunk["output_bytes"], chunk["error_bytes"])
        return self.batches.answered_in(chunk)

    async def _answer(self, work: Work) -> None:
        """Every line of the chunk not answered yet, at most ``concurrency`` of the key's lines in flight, read a few
        at a time off the loop; the chunk marked answered when every line is recorded."""
        import httpx2 as httpx

        batch, chunk, app = work.batch, work.chunk, self.app
        bid, owner = batch["id"], batch["owner"]
        files = BatchFiles(app.state.store.root, bid, chunk["chunk"], work.claim.generation)
        done = await self.files_lane.run(owner, self._chunk_as_recorded, chunk, files, always=True)
        path = await self._input(work)
        if path is None:
            return
        gate = self.gates.setdefault(owner, asyncio.Semaphore(self.concurrency))
        tasks: set[asyncio.Task] = set()
        records: set[asyncio.Future] = set()
        trouble: list[BaseException] = []  # the claim lost, or an answer that could not be recorded

        async def tagged(scope, receive, send):
            tags = {BATCH_SCOPE: bid, OWNER_SCOPE: owner}
            await app({**scope, **tags} if scope["type"] == "http" else scope, receive, send)

        def record(request: dict, status: int, body: bytes) -> None:
            """The answer appended to the part file of this claim's generation, then its line and the parts' lengths
            recorded together, fenced by the claim (in the files lane: one key's answers are written one after
            another)."""
            if work.claim.lost.is_set():
                raise ClaimLost(chunk["id"])
            sizes = files.append(request["custom_id"], status, body)
            self.batches.add_chunk_result(chunk, request["line"], request["custom_id"], status, *sizes, work.claim)

        def halted() -> bool:
            return bid in self.cancelled or self.stopping or bool(trouble)

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=tagged), base_url="http://batch",
                                     timeout=None) as client:
            async def one(request: dict) -> None:
                if halted() or time.time() > batch["expires_at"]:
                    return
                try:
                    r = await client.post(request["url"], json=request["body"])
                    status, body = r.status_code, r.content
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - this line's answer, not the batch's end
                    status, body = 500, failure_body(f"{type(exc).__name__}: {exc}")
                if self.stopping:  # the server stopping cut it short (a 503): answered after the next start
                    return
                recorded = asyncio.ensure_future(self.files_lane.run(owner, record, request, status, body,
                                                                     always=True))
                records.add(recorded)
                try:
                    await asyncio.shield(recorded)  # a cancel waits for no answer, but one being written ends
                except Exception as exc:  # noqa: BLE001 - the chunk stops; it is answered again from its records
                    trouble.append(exc)

            try:
                with InputLines(path, done, chunk) as source:
                    while not halted():
                        requests = await self.files_lane.run(owner, source.next_chunk, READ_AHEAD, always=True)
                        if not requests:
                            break
                        for request in requests:
                            await gate.acquire()
                            if halted():
                                gate.release()
                                break
                            task = asyncio.ensure_future(one(request))
                            for group in (tasks, self.in_flight.setdefault(bid, set())):  # cancel() reaches it
                                group.add(task)
                                task.add_done_callback(group.discard)
                            task.add_done_callback(lambda _: gate.release())
                work.starting = False
                self.wake()  # the key's next chunk starts while this one's last lines end
                if tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
            finally:
                for task in list(tasks):  # the server stops: its lines in flight end with it, answered again later
                    task.cancel()
                if records:  # no answer is recorded after the claim is let go
                    await asyncio.gather(*records, return_exceptions=True)
                if not self.in_flight.get(bid):
                    self.in_flight.pop(bid, None)
        if self.stopping or bid in self.cancelled:
            return
        if trouble and not isinstance(trouble[0], ClaimLost):
            raise trouble[0]
        if not trouble:
            await asyncio.to_thread(self.batches.chunk_done, chunk, work.claim)

    def _finish_soon(self, batch: dict, status: str, chunks: list[dict], claim: Claim) -> None:
        """The finishing this replica decided, in a task of its own under the finishing's ``claim`` (renewed by the
        heartbeat; let go if it stops short: another replica, or the next start, finishes it)."""
        bid = batch["id"]

        async def finishing() -> None:
            ended = False
            try:
                ended = await self._finish(batch, status, chunks, claim)
            except asyncio.CancelledError:
                raise
            except ClaimLost:
                log.info("batch %s: its finishing was taken over", bid)
            except Exception as exc:  # noqa: BLE001 - the batch fails with the reason; the runner goes on
                if self.stopping or transient(exc):  # finished later, by this replica or another
                    log.info("batch %s: finishing stopped here (%s)", bid, exc)
                else:
                    log.exception("batch %s failed while finishing", bid)
                    try:
                        await asyncio.to_thread(self.batches.fail, bid, [{"code": "batch_failed",
                                                                         "message": str(exc)[:500]}], claim)
                        ended = True
                    except ClaimLost:
                        pass
            finally:
                await asyncio.shield(asyncio.to_thread(self.app.state.store.claims.let_go, claim, not ended))
                self.finishing.pop(bid, None)
                self.wake()

        task = asyncio.ensure_future(finishing())
        self.finishing[bid] = (batch["owner"], task)
        claim.on_lost(lambda _: self.loop.call_soon_threadsafe(task.cancel) if self.loop else None)

    async def _finish(self, batch: dict, status: str, chunks: list[dict], claim: Claim) -> bool:
        """The batch's output and error files assembled from its parts (off the loop), kept as its files with its
        final ``status`` in one transaction fenced by ``claim``, then its parts removed; False when another replica
        finishes it."""
        bid, owner, root = batch["id"], batch["owner"], self.app.state.store.root
        row = await asyncio.to_thread(claim.read, self.batches.get, bid, None, True)  # an earlier version's lengths
        made = await self.files_lane.run(owner, assemble, root, bid, (row["output_bytes"], row["error_bytes"]), chunks,
                                         always=True)
        if not await asyncio.to_thread(self._finished, batch, made, status, claim):
            return False
        await self.files_lane.run(owner, remove_parts, root, bid, chunks, always=True)
        self.cancelled.discard(bid)
        return True

    def _finished(self, batch: dict, made: list[tuple], status: str, claim: Claim) -> bool:
        """The files ``made`` (name, path) kept as the batch's output and error files and its final status, in one
        transaction, while ``claim`` still holds; else the files are removed and False."""
        bid, owner, store = batch["id"], batch["owner"], self.app.state.store

        def keep() -> None:
            files = {}
            for name, path in made:
                kept = store.adopt_file(owner, f"{bid}_{name}.jsonl", "batch_output", path)
                files[f"{name}_file_id"] = expire_file(store, kept, batch.get("output_expires_s"))["id"]
            self.batches.finished(bid, status, files)

        try:
            claim.write(keep)
        except ClaimLost:
            for _, path in made:
                path.unlink(missing_ok=True)
            return False
        return True


def _ended(batch: dict, cancelled: set[str], now: float) -> bool:
    """Whether the batch only waits to be finished: cancelled, finalizing or past its window."""
    return batch["status"] in ("cancelling", "finalizing") or batch["id"] in cancelled \
        or now > (batch["expires_at"] or now)
