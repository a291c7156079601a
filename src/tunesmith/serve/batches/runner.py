"""The batch runner: one task in the server answering the active batches, each in a task of its own.

Each request of a batch goes through the server's own route for its URL, in process (an ASGI call, no socket): the
same checks, plan, engine and answer shape as a client's request, its status and body kept as the line's answer
the moment it comes. At most ``concurrency`` lines of a batch are in flight, and the engines see them as one tenant
of their own (``batch:<key>``), so interactive requests of every key keep their turn in the engine's round robin
while a batch fills the rest. Per-key request limits do not count a batch's lines (its concurrency bounds them).

A batch interrupted by a stop goes on from its unanswered lines when the server starts again; ``cancel`` stops
starting lines and cancels those in flight within seconds, and what finished is written out. Past its completion
window a batch ``expired``, with the lines it answered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

from tunesmith.serve.api.auth import OWNER_SCOPE
from tunesmith.serve.batches.lines import output_line, read_requests
from tunesmith.serve.batches.store import BatchStore

log = logging.getLogger("tunesmith.serve")
BATCH_SCOPE = "tunesmith.batch"  # set on a batch line's ASGI scope: the routes share the engine and skip key limits


class BatchRunner:
    def __init__(self, app, concurrency: int):
        self.app, self.concurrency = app, concurrency
        self.cancelled: set[str] = set()
        self.in_flight: dict[str, set[asyncio.Task]] = {}
        self.event: asyncio.Event | None = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.event = asyncio.Event()
        self.task = asyncio.ensure_future(self._loop())

    def stop(self) -> None:
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

    async def _loop(self) -> None:
        """Every active batch runs at once, each its own task (a large batch of one key does not hold another's
        behind it: the engine shares its rows between their tenants)."""
        running: dict[str, asyncio.Task] = {}
        try:
            while True:
                for batch in self.batches.active():
                    if batch["id"] not in running:
                        running[batch["id"]] = asyncio.ensure_future(self._guarded(batch))
                for bid in [b for b, task in running.items() if task.done()]:
                    del running[bid]
                self.event.clear()
                try:
                    await asyncio.wait_for(self.event.wait(), 2.0)
                except TimeoutError:
                    pass
        finally:
            for task in running.values():
                task.cancel()

    async def _guarded(self, batch: dict) -> None:
        try:
            await self._run(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the batch fails with the reason; the runner goes on
            log.exception("batch %s failed", batch["id"])
            self.batches.update(batch["id"], errors=[{"code": "batch_failed", "message": str(exc)[:500]}])
            self.batches.mark(batch["id"], "failed")

    async def _run(self, batch: dict) -> None:
        bid = batch["id"]
        if batch["status"] == "validating":
            self.batches.mark(bid, "in_progress")
        if batch["status"] != "cancelling" and bid not in self.cancelled:
            requests = self._requests(batch)
            if requests is None:
                return
            done = {r["line"] for r in self.batches.results(bid)}
            await self._answer(batch, [r for r in requests if r["line"] not in done])
        now = self.batches.get(bid, any_owner=True)
        cancelled = bid in self.cancelled or now["status"] == "cancelling"
        finished = now["request_counts"]
        expired = not cancelled and finished["completed"] + finished["failed"] < batch["total"]
        self._finish(batch, "cancelled" if cancelled else "expired" if expired else "completed")
        self.cancelled.discard(bid)

    def _requests(self, batch: dict) -> list[dict] | None:
        f = self.app.state.store.get_file(batch["input_file_id"], batch["owner"])
        if f is None:
            self.batches.update(batch["id"], errors=[{"code": "input_file_deleted", "param": "input_file_id",
                                                      "message": f"the input file {batch['input_file_id']} was deleted"}])
            self.batches.mark(batch["id"], "failed")
            return None
        return read_requests(Path(f["storage"]).read_bytes())

    async def _answer(self, batch: dict, pending: list[dict]) -> None:
        import httpx2 as httpx

        bid, gate = batch["id"], asyncio.Semaphore(self.concurrency)
        app = self.app

        async def tagged(scope, receive, send):
            tags = {BATCH_SCOPE: bid, OWNER_SCOPE: batch["owner"]}
            await app({**scope, **tags} if scope["type"] == "http" else scope, receive, send)

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=tagged), base_url="http://batch",
                                     timeout=None) as client:
            async def one(request: dict) -> None:
                async with gate:
                    if bid in self.cancelled or time.time() > batch["expires_at"]:
                        return
                    try:
                        r = await client.post(request["url"], json=request["body"])
                        status, body = r.status_code, r.json()
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - this line's answer, not the batch's end
                        status, body = 500, {"error": {"message": f"{type(exc).__name__}: {exc}"[:500],
                                                       "type": "server_error", "param": None, "code": "batch_line_failed"}}
                    self.batches.add_result(bid, request["line"], request["custom_id"], status, body)

            tasks = {asyncio.ensure_future(one(r)) for r in pending}
            self.in_flight[bid] = tasks
            try:
                await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                self.in_flight.pop(bid, None)

    def _finish(self, batch: dict, status: str) -> None:
        """The output file (answers with a 2xx status) and the error file (the others), then the final status."""
        bid, owner = batch["id"], batch["owner"]
        self.batches.mark(bid, "finalizing")
        lines = [output_line(r["custom_id"], r["status_code"], r["body"]) for r in self.batches.results(bid)]
        files = {}
        for name, keep in (("output", lambda e: e["error"] is None), ("error", lambda e: e["error"] is not None)):
            chosen = [e for e in lines if keep(e)]
            if chosen:
                content = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in chosen).encode()
                files[f"{name}_file_id"] = self.app.state.store.add_file(owner, f"{bid}_{name}.jsonl", "batch_output",
                                                                         content)["id"]
        self.batches.update(bid, **files)
        self.batches.mark(bid, status)
