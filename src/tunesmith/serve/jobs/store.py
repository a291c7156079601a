"""Fine-tuning jobs, their events and checkpoints in the server's store: a job's row from its creation through the
fair queue (chosen in SQL), its claim by a worker, the steps and checkpoints its training reports, and the models it
continues from. A job belongs to the key that created it; events carry a ``dedup_key`` with a unique index, so a
worker that resumes after a crash and reports a step again does not duplicate its event.

A :class:`JobStore` is the store as the jobs room sees it: these methods, and every other of the
:class:`~tunesmith.serve.store.Store` it wraps (files, the claims, a job's row written, the fine-tuned models the API
serves), so that one object, fenced by a job's claim (:class:`~tunesmith.serve.store.claims.Fenced`), writes the
job's rows and its result file alike."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

from tunesmith.serve.store import Store, new_id
from tunesmith.serve.store.claims import Claim, held
from tunesmith.serve.store.objects import job_row
from tunesmith.serve.store.pages import page_rows


class JobStore:
    def __init__(self, store: Store):
        self.db, self.lock, self.claims, self.base = store.db, store.lock, store.claims, store

    def __getattr__(self, name: str):
        """Whatever is not the jobs' own is the wrapped store's (its files, its root, a job's row written)."""
        if name == "base":  # an object made without __init__ (a copy): no store to ask
            raise AttributeError(name)
        return getattr(self.base, name)

    # --- jobs -------------------------------------------------------------------------------

    def add_job(self, owner: str | None, **fields) -> dict:
        jid = new_id("ftjob")
        row = {"id": jid, "owner": owner, "status": "validating_files", "created_at": int(time.time()), **fields}
        for key in ("method", "metadata", "integrations"):
            row[key] = json.dumps(row.get(key))
        cols = ", ".join(row)
        with self.lock:
            self.db.execute(f"INSERT INTO jobs ({cols}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
        return self.get_job(jid, owner)

    def get_job(self, jid: str, owner: str | None = None, any_owner: bool = False) -> dict | None:
        if any_owner:
            row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (jid,)).fetchone()
        else:
            row = self.db.execute("SELECT * FROM jobs WHERE id = ? AND owner IS ?", (jid, owner)).fetchone()
        return job_row(row) if row else None

    def list_jobs(self, owner: str | None, after: str | None = None, limit: int = 20,
                  metadata: dict[str, str] | None = None) -> tuple[list[dict], bool]:
        """One page of the owner's jobs, newest first, and whether more follow; with ``metadata``, only the jobs
        carrying every pair ({}: the jobs without metadata)."""
        where, args = "owner IS ?", [owner]
        if metadata == {}:
            where += " AND (metadata IS NULL OR metadata IN ('null', '{}'))"
        for k, v in (metadata or {}).items():
            where, args = where + f" AND {self._metadata_pair()}", [*args, k, v]
        rows, more = page_rows(self.db, "jobs", where, args, ("created_at", "rowid"), after, limit)
        return [job_row(r) for r in rows], more

    def _metadata_pair(self) -> str:
        """SQL true when the row's ``metadata`` (a JSON object) holds the pair given as two parameters (key, value)."""
        if self.db.kind == "postgresql":
            return "json_extract_path_text(metadata::json, ?) = ?"
        return "EXISTS (SELECT 1 FROM json_each(metadata) WHERE json_each.key = ? AND json_each.value = ?)"

    def all_jobs(self) -> list[dict]:
        return [job_row(r) for r in self.db.execute("SELECT * FROM jobs ORDER BY created_at, rowid")]

    def next_job(self, jobs_per_key: int | None = None, ignore_claims: bool = False) -> dict | None:
        """The job to run next, chosen in SQL (one row read): one left 'running' by a dead worker first (running, and
        no live claim on it), then the first queued job nobody holds in fair order (:meth:`queue_positions`) whose key
        runs fewer than ``jobs_per_key`` jobs (its jobs claimed and not started yet count as running).
        ``ignore_claims``: every claim is a dead worker's (the only worker there can be, at its start)."""
        live = "FALSE" if ignore_claims else held()
        row = self.db.execute(f"SELECT * FROM jobs WHERE status = 'running' AND NOT {live} ORDER BY created_at, rowid "
                              "LIMIT 1").fetchone()
        if row is not None:
            return job_row(row)
        cap, args = ("", ()) if jobs_per_key is None else (" WHERE COALESCE(b.n, 0) < ?", (jobs_per_key,))
        row = self.db.execute(
            f"WITH busy AS (SELECT COALESCE(owner, '') AS who, COUNT(*) AS n FROM jobs WHERE status = 'running' OR "
            f"(status = 'queued' AND {live}) GROUP BY COALESCE(owner, '')), waiting AS (SELECT id, COALESCE(owner, '') "
            "AS who, created_at, rowid AS seq, ROW_NUMBER() OVER (PARTITION BY COALESCE(owner, '') ORDER BY "
            f"created_at, rowid) - 1 AS k FROM jobs WHERE status = 'queued' AND NOT {live}) SELECT w.id FROM waiting w "
            f"LEFT JOIN busy b ON b.who = w.who{cap} ORDER BY COALESCE(b.n, 0) + w.k, w.created_at, w.seq LIMIT 1",
            args).fetchone()
        return self.get_job(row[0], any_owner=True) if row is not None else None

    def queue_positions(self, ids: list[str]) -> dict[str, int]:
        """Job id → its place in the queue (1: starts next) for those of ``ids`` that are queued. The queue's order:
        round robin over keys, so one key's many jobs cannot starve the others; a key's k-th queued job (from 0)
        goes in round ``running jobs of the key + k``, within a round the older job first. Ranked in SQL."""
        if not ids:
            return {}
        marks = ", ".join("?" * len(ids))
        rows = self.db.execute(
            "WITH busy AS (SELECT COALESCE(owner, '') AS who, COUNT(*) AS n FROM jobs WHERE status = 'running' GROUP BY "
            "COALESCE(owner, '')), waiting AS (SELECT id, COALESCE(owner, '') AS who, created_at, rowid AS seq, "
            "ROW_NUMBER() OVER (PARTITION BY COALESCE(owner, '') ORDER BY created_at, rowid) - 1 AS k FROM jobs WHERE "
            "status = 'queued'), ranked AS (SELECT w.id, ROW_NUMBER() OVER (ORDER BY COALESCE(b.n, 0) + w.k, "
            "w.created_at, w.seq) AS place FROM waiting w LEFT JOIN busy b ON b.who = w.who) "
            f"SELECT id, place FROM ranked WHERE id IN ({marks})", ids)
        return {r[0]: int(r[1]) for r in rows}

    # --- claims: the next job taken by a worker (tunesmith.serve.store.claims) ----------------------------------

    def claim_job(self, worker: str, jobs_per_key: int | None = None, sole: bool = False) -> tuple[dict, Claim] | None:
        """The next job (:meth:`next_job`) claimed for ``worker`` in a new generation, in one transaction that claimers
        take one at a time; with the claim, held and renewed by this process's heartbeat. ``sole``: this worker is the
        only one there can be (SQLite's, under the data folder's lock), so every other claim is a dead one's."""
        with self.db.transaction():
            self.db.serialize("claim_job")
            job = self.next_job(jobs_per_key, ignore_claims=sole)
            if job is None:
                return None
            taken = self.claims.take("jobs", job["id"], worker, " AND status IN ('queued', 'running')", force=True)
            if taken is None:  # cancelled or ended after the look above: a job that ended never runs again
                return None
        job |= {"generation": taken[0], "claimed_by": worker}
        return job, self.claims.adopt("jobs", job["id"], worker, *taken)

    # --- events and checkpoints ------------------------------------------------------------------

    def add_event(self, job_id: str, message: str, type_: str = "message", data: dict | None = None,
                  level: str = "info", dedup_key: str | None = None) -> bool:
        """Record an event once; returns False when an event with the same dedup_key exists."""
        with self.lock:
            cur = self.db.execute(
                "INSERT OR IGNORE INTO events (id, job_id, created_at, level, message, type, data, dedup_key) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (new_id("ftevent"), job_id, int(time.time()), level, message, type_,
                 json.dumps(data) if data is not None else None, dedup_key or secrets.token_hex(8)),
            )
            return cur.rowcount == 1

    def events(self, job_id: str) -> list[dict]:
        rows = self.db.execute("SELECT * FROM events WHERE job_id = ? ORDER BY seq DESC", (job_id,))
        return [_event(r) for r in rows]

    def events_page(self, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        """One page of the job's events, newest first, and whether more follow."""
        rows, more = page_rows(self.db, "events", "job_id = ?", [job_id], ("seq",), after, limit)
        return [_event(r) for r in rows], more

    def supersede_steps(self, job_id: str, after: int) -> None:
        """Forget the step events and checkpoints past ``after``: a restart reports those steps again."""
        with self.lock:
            self.db.execute("DELETE FROM events WHERE job_id = ? AND type = 'metrics' "
                            f"AND CAST({self.db.json_field('data', 'step')} AS INTEGER) > ?", (job_id, after))
            self.db.execute("DELETE FROM events WHERE job_id = ? AND dedup_key LIKE 'ckpt:%' "
                            "AND CAST(substr(dedup_key, 6) AS INTEGER) > ?", (job_id, after))
            self.db.execute("DELETE FROM checkpoints WHERE job_id = ? AND step_number > ?", (job_id, after))

    def add_checkpoint(self, job_id: str, step: int, metrics: dict, path: str, model_name: str) -> None:
        with self.lock:
            self.db.execute("INSERT OR IGNORE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (new_id("ftckpt"), job_id, step, int(time.time()), json.dumps(metrics), path,
                             f"{model_name}:ckpt-step-{step}"))

    def update_checkpoint_metrics(self, job_id: str, step: int, metrics: dict) -> None:
        with self.lock:
            self.db.execute("UPDATE checkpoints SET metrics = ? WHERE job_id = ? AND step_number = ?",
                            (json.dumps(metrics), job_id, step))

    def checkpoints(self, job_id: str) -> list[dict]:
        rows = self.db.execute("SELECT * FROM checkpoints WHERE job_id = ? ORDER BY step_number DESC", (job_id,))
        return [_checkpoint(r) for r in rows]

    def checkpoints_page(self, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        """One page of the job's checkpoints whose weights are still kept (the trainer keeps the newest; only those
        can be served), the latest step first, and whether more follow: read a page at a time in SQL."""
        kept, more = [], True
        while more and len(kept) <= limit:
            rows, more = page_rows(self.db, "checkpoints", "job_id = ?", [job_id], ("step_number",), after, limit + 1)
            kept += [_checkpoint(r) for r in rows if Path(r["path"]).is_dir()]
            after = rows[-1]["id"] if rows else after
        return kept[:limit], len(kept) > limit

    def fine_tune(self, name: str, owner: str | None) -> tuple[dict, Path] | None:
        """``name`` (a succeeded job's fine-tuned model, or one of its checkpoints' models) if it is ``owner``'s
        and its weights are still kept: (the job that made it, the folder of its adapter); else None."""
        job = self.base.job_by_model(name)
        if job is not None and job["owner"] == owner and job["status"] == "succeeded" and not job["model_deleted"] \
                and job.get("run_dir"):
            folder = Path(job["run_dir"]) / "train" / "adapter"
            return (job, folder) if folder.is_dir() else None
        ckpt = self.base.checkpoint_by_model(name)
        if ckpt is not None and ckpt["owner"] == owner and Path(ckpt["path"]).is_dir():
            return self.get_job(ckpt["job_id"], owner), Path(ckpt["path"])
        return None


def _event(row) -> dict:
    return {**dict(row), "data": json.loads(row["data"]) if row["data"] else None}


def _checkpoint(row) -> dict:
    return {**dict(row), "metrics": json.loads(row["metrics"])}
