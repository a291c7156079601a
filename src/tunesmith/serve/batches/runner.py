"""The batch runner: one task in the server starting each key's batches, one at a time per key, each in a task of its
own.

Each request of a batch goes through the server's own route for its URL, in process (an ASGI call, no socket), as its
batch's owner: the same checks, plan, engine and answer shape as a client's request. Its rows are the key's own
*background* rows in the engine (:mod:`tunesmith.serve.engines.shares`): they count in the key's share of every step,
after every interactive row, so a key's batches slow no other key more than its own requests would, and a key with
several batches runs them one after another (the others wait, ``validating``). At most ``concurrency`` lines of a
batch are in flight.

Nothing of a batch is held whole, in memory or in SQLite: its input is read in chunks, off the event loop (the files
lane), and each answer is appended to the batch's output or error file as it comes, the line written off the loop
and only its number, status and the files' lengths recorded in the store, in one transaction. A batch interrupted by
a stop cuts its files back to the recorded lengths and goes on from its unanswered lines when the server starts
again; ``cancel`` stops starting lines and cancels those in flight within seconds, and what finished is kept. Past
its completion window a batch ``expired``, with the lines it answered.

The runner's own store work (its scan every two seconds, a batch's claim and changes of status) runs in a thread,
never on the event loop: a slow store (one key's long transaction holds its write lock) must not stall every key's
requests. It is not the store lane's (a key's requests'): it must run while the server stops, after the lanes have
closed.
"""

from __future__ import annotations

import asyncio
import logging
import time

from tunesmith.serve.api.auth import OWNER_SCOPE
from tunesmith.serve.batches.output import BatchFiles, InputLines, failure_body
from tunesmith.serve.batches.store import BatchStore
from tunesmith.serve.jobs.routes import expire_file

log = logging.getLogger("tunesmith.serve")
BATCH_SCOPE = "tunesmith.batch"  # set on a batch line's ASGI scope: the routes skip key limits, rows in the background
CHUNK_LINES = 64  # input lines read at a time


class BatchRunner:
    def __init__(self, app, concurrency: int):
        self.app, self.concurrency = app, concurrency
        self.cancelled: set[str] = set()
        self.in_flight: dict[str, set[asyncio.Task]] = {}
        self.event: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.stopping = False

    def start(self) -> None:
        self.event = asyncio.Event()
        self.task = asyncio.ensure_future(self._loop())

    def stop(self) -> None:
        self.stopping = True  # what fails from here on is the server stopping (its lanes closed), not the batch
        if self.task is not None:
            self.task.cancel()

    def wake(self) -> None:
        if self.event is not None:
            self.event.set()

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

    async def _loop(self) -> None:
        """Each key's oldest active batch runs, the others of that key wait their turn; different keys' batches run
        side by side (the engine shares each step over keys). A batch is claimed by the replica that runs it, its
        claim renewed at every turn of this loop: replicas sharing a store run each batch once, and a batch whose
        replica died is taken over from its recorded lines."""
        running: dict[str, asyncio.Task] = {}
        try:
            while True:
                for bid in [b for b, task in running.items() if task.done()]:
                    del running[bid]
                self.event.clear()  # a wake from here on is seen at the next turn
                lost, claimed = await asyncio.to_thread(self._scan, set(running))
                for bid in lost:
                    running.pop(bid).cancel()  # another replica took it over: this one's lease had run out
                for batch in claimed:
                    running[batch["id"]] = asyncio.ensure_future(self._guarded(batch))
                try:
                    await asyncio.wait_for(self.event.wait(), 2.0)
                except TimeoutError:
                    pass
        finally:
            for task in running.values():
                task.cancel()

    def _scan(self, running: set[str]) -> tuple[set[str], list[dict]]:
        """(the ``running`` batches whose claim another replica took over, the batches to start now, each claimed by
        this replica), in one look at the store from a thread. Once the server stops, nothing is claimed (what was
        claimed meanwhile is let go: no replica waits out the lease of a batch that never started)."""
        store, me = self.app.state.store, self.app.state.replica
        lost = store.renew("batches", list(running), me)
        running = running - lost
        active = self.batches.active()
        elsewhere = store.held_elsewhere("batches", me)
        busy = {b["owner"] for b in active if b["id"] in running or b["id"] in elsewhere}
        claimed = []
        for batch in active:
            waits = batch["owner"] in busy and batch["status"] != "cancelling"  # a cancel ends at once
            if batch["id"] in running or batch["id"] in elsewhere or waits:
                continue
            if not store.claim("batches", batch["id"], me):
                continue
            busy.add(batch["owner"])
            claimed.append(batch)
        if self.stopping:
            for batch in claimed:
                store.release("batches", batch["id"], me)
            return lost, []
        return lost, claimed

    async def _guarded(self, batch: dict) -> None:
        try:
            await self._run(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the batch fails with the reason; the runner goes on
            if self.stopping:  # stays in progress: the next start goes on from its recorded lines
                log.info("batch %s stopped with the server (%s)", batch["id"], exc)
                return
            log.exception("batch %s failed", batch["id"])
            await asyncio.to_thread(self._failed, batch["id"], [{"code": "batch_failed", "message": str(exc)[:500]}])
        finally:
            await asyncio.shield(asyncio.to_thread(self.app.state.store.release, "batches", batch["id"],
                                                   self.app.state.replica))
            self.wake()  # the key's next batch may start

    def _failed(self, bid: str, errors: list[dict]) -> None:
        self.batches.update(bid, errors=errors)
        self.batches.mark(bid, "failed")

    async def _run(self, batch: dict) -> None:
        bid = batch["id"]
        files = BatchFiles(self.app.state.store.root, bid)
        if batch["status"] == "validating":
            await asyncio.to_thread(self.batches.mark, bid, "in_progress")
        await self.files_lane.run(batch["owner"], self._files_as_recorded, batch, files)
        if batch["status"] != "cancelling" and bid not in self.cancelled:
            f = await asyncio.to_thread(self.app.state.store.get_file, batch["input_file_id"], batch["owner"])
            if f is None:
                await asyncio.to_thread(self._failed, bid, [{
                    "code": "input_file_deleted", "param": "input_file_id",
                    "message": f"the input file {batch['input_file_id']} was deleted"}])
                return
            await self._answer(batch, f["storage"], files)
        if self.stopping:  # stays in progress: the next holder goes on from its recorded lines
            return
        now = await asyncio.to_thread(self.batches.get, bid, None, True)
        cancelled = bid in self.cancelled or now["status"] == "cancelling"
        counts = now["request_counts"]
        expired = not cancelled and counts["completed"] + counts["failed"] < batch["total"]
        await self._finish(batch, files, "cancelled" if cancelled else "expired" if expired else "completed")
        self.cancelled.discard(bid)

    def _files_as_recorded(self, batch: dict, files: BatchFiles) -> None:
        """The batch's files cut back to their recorded lengths; answers an earlier version kept in the store are
        written out first."""
        files.cut_to(batch["output_bytes"], batch["error_bytes"])
        stored = self.batches.stored_answers(batch["id"])
        if stored and not batch["output_bytes"] and not batch["error_bytes"]:
            for row in stored:
                sizes = files.append(row["custom_id"], row["status_code"], row["body"].encode())
                self.batches.add_result(batch["id"], row["line"], row["custom_id"], row["status_code"], *sizes)

    async def _answer(self, batch: dict, input_path: str, files: BatchFiles) -> None:
        """Every line not answered yet, at most ``concurrency`` in flight, read chunk by chunk off the loop."""
        import httpx2 as httpx

        bid, owner, gate = batch["id"], batch["owner"], asyncio.Semaphore(self.concurrency)
        done = await self.files_lane.run(owner, self.batches.answered_lines, bid)
        app = self.app

        async def tagged(scope, receive, send):
            tags = {BATCH_SCOPE: bid, OWNER_SCOPE: owner}
            await app({**scope, **tags} if scope["type"] == "http" else scope, receive, send)

        tasks: set[asyncio.Task] = set()
        self.in_flight[bid] = tasks
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=tagged), base_url="http://batch",
                                     timeout=None) as client:
            async def one(request: dict) -> None:
                if bid in self.cancelled or time.time() > batch["expires_at"]:
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
                await self.files_lane.run(owner, record, request, status, body)

            def record(request: dict, status: int, body: bytes) -> None:
                """The answer appended to its file, then its line and the files' lengths recorded together (in the
                files lane: one key's answers are written one after another)."""
                sizes = files.append(request["custom_id"], status, body)
                self.batches.add_result(bid, request["line"], request["custom_id"], status, *sizes)

            try:
                with InputLines(input_path, done) as source:
                    while bid not in self.cancelled and not self.stopping:
                        chunk = await self.files_lane.run(owner, source.next_chunk, CHUNK_LINES)
                        if not chunk:
                            break
                        for request in chunk:
                            await gate.acquire()
                            if bid in self.cancelled or self.stopping:
                                gate.release()
                                break
                            task = asyncio.ensure_future(one(request))
                            tasks.add(task)
                            task.add_done_callback(tasks.discard)
                            task.add_done_callback(lambda _: gate.release())
                if tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
            finally:
                for task in list(tasks):  # the server stops: its lines in flight end with it, answered again later
                    task.cancel()
                self.in_flight.pop(bid, None)

    async def _finish(self, batch: dict, files: BatchFiles, status: str) -> None:
        """The output file (answers with a 2xx status) and the error file (the others) kept as the batch's files,
        then the final status."""
        bid, owner = batch["id"], batch["owner"]
        await asyncio.to_thread(self.batches.mark, bid, "finalizing")
        finished = await self.files_lane.run(owner, files.finished)
        await asyncio.to_thread(self._finished, batch, finished, status)

    def _finished(self, batch: dict, finished: list[tuple], status: str) -> None:
        """The batch's ``finished`` files (name, path) kept as its output and error files, then its final status."""
        bid, owner, store = batch["id"], batch["owner"], self.app.state.store
        made = {}
        for name, path in finished:
            made_file = store.adopt_file(owner, f"{bid}_{name}.jsonl", "batch_output", path)
            made[f"{name}_file_id"] = expire_file(store, made_file, batch.get("output_expires_s"))["id"]
        if made:
            self.batches.update(bid, **made)
        self.batches.mark(bid, status)
