"""Eval runs claimed, not owned: a run's rows are kept on the shared data folder from its creation until its end,
so that a run whose server stopped or whose replica died is claimed by a live replica and run again from them.

The replica that creates a run claims it and runs it at once (:func:`start`), renewing its claim while it runs.
Every replica looks every third of a lease for runs left queued or in progress that no live replica holds (on
SQLite, the only server, at its start: every such run) and claims them; each is run again from its kept rows, the
output items a dead replica had written first deleted, so every row has one item. A run whose rows were not kept
(made by an earlier version) is failed with the reason, as before.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

from tunesmith.serve.evals.grading import context_for
from tunesmith.serve.evals.run import execute
from tunesmith.serve.evals.store import EvalStore
from tunesmith.serve.store.claims import LEASE_S, Claim, ClaimLost, Fenced, free
from tunesmith.serve.store.database import log_failure

log = logging.getLogger("tunesmith.serve")
ROWS_DIR = "eval_runs"  # under the data folder: <run id>.jsonl, a run's rows while it is queued or running


def rows_path(root: Path, run_id: str) -> Path:
    return Path(root) / ROWS_DIR / f"{run_id}.jsonl"


def keep_rows(root: Path, run_id: str, rows: list[dict]) -> None:
    """The run's rows written where any replica reads them (whole or not at all: written aside, then renamed)."""
    path = rows_path(root, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_suffix(".part")
    with open(aside, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(aside, path)


def kept_rows(root: Path, run_id: str) -> list[dict] | None:
    path = rows_path(root, run_id)
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def claim_abandoned(store, replica: str, everyone: bool = False, running: frozenset[str] = frozenset()) -> list[tuple[dict, Claim]]:
    """The runs left queued or in progress that no live replica holds (``everyone``: all of them, for the only
    server of a SQLite store at its start), each claimed for ``replica`` in a new generation (its earlier holder's
    writes refused from then on); a run another replica claims first is left to it, and so is one this replica runs
    (``running``: its lease may have run out while the database was away; its own heartbeat renews it)."""
    sql = "SELECT id, eval_id FROM eval_runs WHERE status IN ('queued', 'in_progress')"
    if not everyone:
        sql += f" AND {free()}"
    evals, claimed = EvalStore(store), []
    for run_id, eval_id in store.db.execute(sql).fetchall():
        if run_id in running:
            continue
        # the status checked again in the claim's own statement: a run that ended after the look above (and let its
        # claim go) is not taken, so its output items are never deleted to run it again
        claim = store.claims.acquire("eval_runs", run_id, replica, " AND status IN ('queued', 'in_progress')",
                                     force=everyone)
        if claim is None:
            continue
        if (run := evals.get_run(eval_id, run_id)) is not None:
            claimed.append((run, claim))
        else:
            store.claims.let_go(claim)
    return claimed


READS = frozenset({"get_run", "get_eval", "output_items"})  # a run's reads, never fenced


def prepared(store, run: dict, claim: Claim) -> tuple[dict, list[dict]] | None:
    """(the eval, the rows) of a run claimed (``claim``), to run again: its earlier output items deleted and its
    status queued, fenced by the claim; None when it cannot run again (failed here with the reason and let go, or
    cancelled)."""
    evals = Fenced(EvalStore(store), claim, READS)
    eval_ = evals.get_eval(run["eval_id"], run["owner"])
    rows = kept_rows(store.root, run["id"])
    if eval_ is None or rows is None:
        evals.move_run(run["id"], ("queued", "in_progress"), status="failed", error={
            "code": "server_restarted", "message": "the server stopped during this run and its rows were not kept; "
            "create the run again"})
        store.claims.let_go(claim)
        return None
    evals.delete_output_items(run["id"])
    if not evals.move_run(run["id"], ("queued", "in_progress"), status="queued"):
        store.claims.let_go(claim)
        return None  # cancelled meanwhile
    return eval_, rows


def start(app, key, eval_: dict, run: dict, rows: list[dict], claim: Claim) -> asyncio.Task:
    """Run ``run`` (claimed by this replica: ``claim``) in a task of its own, in ``key``'s turn of the evals lane,
    every write fenced by the claim (renewed by the heartbeat); its kept rows are deleted when it ends, its claim let
    go. A claim lost stops the run at its next look (nothing more of it is written) and cancels its task."""
    store, lanes = app.state.store, app.state.lanes
    evals = Fenced(EvalStore(store), claim, READS)
    context = context_for(app, key, asyncio.get_running_loop())
    tasks = app.state.__dict__.setdefault("eval_tasks", {})

    def cancelled() -> bool:
        if claim.lost.is_set():
            return True
        current = evals.get_run(eval_["id"], run["id"])
        return current is None or current["status"] == "canceled"

    def ended() -> None:
        store.claims.let_go(claim)
        try:
            current = EvalStore(store).get_run(eval_["id"], run["id"])
        except Exception:  # noqa: BLE001 - the store unreachable: the rows stay for the run's next holder
            return
        if current is not None and current["status"] not in ("queued", "in_progress"):
            rows_path(store.root, run["id"]).unlink(missing_ok=True)

    async def held() -> None:
        try:
            await lanes.evals.run(key, execute, evals, eval_, run, rows, context, cancelled)
        except ClaimLost as lost:
            log.warning("eval run %s: stopped here, its claim lost (%s); its next holder runs it", run["id"], lost)
        finally:
            tasks.pop(run["id"], None)
            await asyncio.shield(asyncio.to_thread(ended))

    task = asyncio.ensure_future(held())
    tasks[run["id"]] = task
    loop = asyncio.get_running_loop()
    claim.on_lost(lambda _: loop.call_soon_threadsafe(task.cancel))
    return task


async def resume_abandoned(app, everyone: bool = False) -> int:
    """Claim the runs no live replica holds and start each again from its rows; returns how many started."""
    store, replica = app.state.store, app.state.replica
    running = frozenset(app.state.__dict__.get("eval_tasks", {}))
    started = 0
    for run, claim in await asyncio.to_thread(claim_abandoned, store, replica, everyone, running):
        try:
            ready = await asyncio.to_thread(prepared, store, run, claim)
        except ClaimLost:
            continue
        if ready is None:
            continue
        eval_, rows = ready
        log.info("eval run %s: taken over by this replica, run again from its %d rows", run["id"], len(rows))
        start(app, run["owner"], eval_, run | {"status": "queued"}, rows, claim)
        started += 1
    return started


async def watch(app) -> None:
    """Every third of a lease: runs a dead replica left, claimed and run again here."""
    while True:
        await asyncio.sleep(LEASE_S / 3)
        try:
            await resume_abandoned(app)
        except Exception as exc:  # noqa: BLE001 - looked at again at the next turn
            log_failure(log, "looking for eval runs to take over failed", exc)
