"""The server's store for files, fine-tuning jobs, their events and checkpoints (and, through the modules beside it,
every other object a key keeps): SQLite in the data folder, or PostgreSQL (:mod:`tunesmith.serve.store.database`).

Schema changes are named, ordered migrations recorded in ``schema_migrations``; a database is
brought up to date when opened. A migration is SQL, or a Python step called with the connection and
the data folder inside the same transaction. Every ``owner`` is an owner id (:mod:`tunesmith.serve.store.keys`),
never an API key. Ids are opaque random strings and are never used as paths:
uploaded bytes live at ``<root>/files/<random>.jsonl`` under a name the store chose.
Events carry a ``dedup_key`` with a unique index, so a worker that resumes after a crash and
re-reports a step does not duplicate its event.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path

from tunesmith.serve.store.claims import Claim, Claims, claimable, held
from tunesmith.serve.store.database import PostgresDatabase, SQLiteDatabase, open_database
from tunesmith.serve.store.migrations import MIGRATIONS
from tunesmith.serve.store.pages import page_rows

Database = SQLiteDatabase | PostgresDatabase
log = logging.getLogger("tunesmith.serve")


def worker_id() -> str:
    """This process among every replica's (a claim's holder): host, pid and a random part (a pid is reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


JSON_COLUMNS = ("method", "metadata", "error", "result_files", "integrations")

def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class Store:
    def __init__(self, root: Path, database: str | None = None):
        """The store of data folder ``root`` (uploaded bytes, runs; SQLite's file unless ``database``, a
        ``postgresql://`` URL, holds the tables)."""
        self.root = Path(root)
        (self.root / "files").mkdir(parents=True, exist_ok=True)
        self.db = open_database(database, self.root)
        self.lock = self.db.lock
        self.migrate()
        self.claims = Claims(self.db)  # this process's claims of work, renewed by its heartbeat

    def close(self) -> None:
        """The heartbeat stopped (the claims held are left to their leases) and the database closed."""
        self.claims.close()
        self.db.close()

    def migrate(self) -> list[str]:
        """Apply the migrations this database has not seen, in order, in one transaction that first takes the
        database's migration lock (processes and replicas opening it at once wait for each other instead of both
        creating the same table); returns their names."""
        with self.db.migrating():
            self.db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at REAL)")
            done = {r[0] for r in self.db.execute("SELECT name FROM schema_migrations")}
            applied = []
            for name, step in MIGRATIONS:
                if name not in done:
                    if isinstance(step, str):
                        self.db.execute(step)
                    else:
                        step(self.db, self.root)
                    self.db.execute("INSERT INTO schema_migrations VALUES (?, ?)", (name, time.time()))
                    applied.append(name)
        return applied

    # --- files ------------------------------------------------------------------------------

    def add_file(self, owner: str | None, filename: str, purpose: str, content: bytes) -> dict:
        incoming = self.root / "files" / f"part-{secrets.token_hex(16)}.bin"
        incoming.write_bytes(content)
        return self.adopt_file(owner, filename, purpose, incoming)

    def adopt_file(self, owner: str | None, filename: str, purpose: str, path: Path,
                   expires_s: int | None = None) -> dict:
        """A file made of ``path`` (moved into the store, never read into memory: a received upload, a batch's
        output), expiring ``expires_s`` after its creation (None: kept until deleted); nothing is kept when its row
        cannot be written."""
        fid, now = new_id("file"), int(time.time())
        storage = self.root / "files" / f"{secrets.token_hex(16)}.jsonl"
        Path(path).replace(storage)
        try:
            with self.lock:
                self.db.execute("INSERT INTO files (id, owner, filename, purpose, bytes, created_at, storage, expires_at) "
                                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                (fid, owner, filename, purpose, storage.stat().st_size, now, str(storage),
                                 None if expires_s is None else now + expires_s))
        except BaseException:
            storage.unlink(missing_ok=True)
            raise
        return self.get_file(fid, owner)

    def get_file(self, fid: str, owner: str | None) -> dict | None:
        row = self.db.execute("SELECT * FROM files WHERE id = ? AND owner IS ?", (fid, owner)).fetchone()
        return dict(row) if row else None

    def list_files(self, owner: str | None, purpose: str | None = None, after: str | None = None,
                   limit: int = 10_000, order: str = "desc") -> tuple[list[dict], bool]:
        """One page of the owner's files (of ``purpose``), by creation, and whether more follow."""
        where, args = "owner IS ?", [owner]
        if purpose:
            where, args = where + " AND purpose = ?", [*args, purpose]
        rows, more = page_rows(self.db, "files", where, args, ("created_at", "rowid"), after, limit, order == "desc")
        return [dict(r) for r in rows], more

    def delete_file(self, fid: str, owner: str | None) -> bool:
        f = self.get_file(fid, owner)
        if f is None:
            return False
        with self.lock:
            self.db.execute("DELETE FROM files WHERE id = ?", (fid,))
        Path(f["storage"]).unlink(missing_ok=True)
        return True

    # --- uploads in parts ---------------------------------------------------------------------

    def add_upload(self, owner: str | None, filename: str, purpose: str, size: int, mime_type: str,
                   expires_s: int) -> dict:
        uid, now = new_id("upload"), int(time.time())
        with self.lock:
            self.db.execute("INSERT INTO uploads (id, owner, filename, purpose, bytes, mime_type, status, created_at, expires_at) "
                            "VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                            (uid, owner, filename, purpose, size, mime_type, now, now + expires_s))
        return self.get_upload(uid, owner)

    def get_upload(self, uid: str, owner: str | None) -> dict | None:
        row = self.db.execute("SELECT * FROM uploads WHERE id = ? AND owner IS ?", (uid, owner)).fetchone()
        return dict(row) if row else None

    def set_upload(self, uid: str, status: str, file_id: str | None = None) -> None:
        """An upload's new status; its parts' bytes go once it is no longer pending."""
        with self.lock:
            self.db.execute("UPDATE uploads SET status = ?, file_id = ? WHERE id = ?", (status, file_id, uid))
            parts = self.upload_parts(uid)
            self.db.execute("DELETE FROM upload_parts WHERE upload_id = ?", (uid,))
        for part in parts:
            Path(part["storage"]).unlink(missing_ok=True)

    def add_upload_part(self, uid: str, content: bytes) -> dict:
        pid = new_id("part")
        storage = self.root / "files" / f"part-{secrets.token_hex(16)}.bin"
        storage.write_bytes(content)
        with self.lock:
            self.db.execute("INSERT INTO upload_parts VALUES (?, ?, ?, ?, ?)",
                            (pid, uid, int(time.time()), len(content), str(storage)))
        return dict(self.db.execute("SELECT * FROM upload_parts WHERE id = ?", (pid,)).fetchone())

    def upload_parts(self, uid: str) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM upload_parts WHERE upload_id = ? ORDER BY rowid", (uid,))]

    # --- responses (kept for previous_response_id) ------------------------------------------

    def add_response(self, owner: str | None, response: dict, messages: list[dict]) -> None:
        """A Responses answer and the conversation it ends (chat messages, without the instructions)."""
        with self.lock:
            self.db.execute("INSERT INTO responses VALUES (?, ?, ?, ?, ?)", (
                response["id"], owner, response["created_at"], json.dumps(messages), json.dumps(response)))

    def get_response(self, rid: str, owner: str | None) -> tuple[dict, list[dict]] | None:
        row = self.db.execute("SELECT * FROM responses WHERE id = ? AND owner IS ?", (rid, owner)).fetchone()
        return (json.loads(row["response"]), json.loads(row["messages"])) if row else None

    def delete_response(self, rid: str, owner: str | None) -> bool:
        with self.lock:
            return self.db.execute("DELETE FROM responses WHERE id = ? AND owner IS ?", (rid, owner)).rowcount > 0

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
        return _job(row) if row else None

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
        return [_job(r) for r in rows], more

    def _metadata_pair(self) -> str:
        """SQL true when the row's ``metadata`` (a JSON object) holds the pair given as two parameters (key, value)."""
        if self.db.kind == "postgresql":
            return "json_extract_path_text(metadata::json, ?) = ?"
        return "EXISTS (SELECT 1 FROM json_each(metadata) WHERE json_each.key = ? AND json_each.value = ?)"

    def all_jobs(self) -> list[dict]:
        return [_job(r) for r in self.db.execute("SELECT * FROM jobs ORDER BY created_at, rowid")]

    def update_job(self, jid: str, **fields) -> None:
        for key in JSON_COLUMNS:
            if key in fields and not isinstance(fields[key], str | None):
                fields[key] = json.dumps(fields[key])
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.lock:
            self.db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", [*fields.values(), jid])

    def next_job(self, jobs_per_key: int | None = None, ignore_claims: bool = False) -> dict | None:
        """The job to run next, chosen in SQL (one row read): one left 'running' by a dead worker first (running, and
        no live claim on it), then the first queued job nobody holds in fair order (:meth:`queue_positions`) whose key
        runs fewer than ``jobs_per_key`` jobs (its jobs claimed and not started yet count as running).
        ``ignore_claims``: every claim is a dead worker's (the only worker there can be, at its start)."""
        live = "FALSE" if ignore_claims else held()
        row = self.db.execute(f"SELECT * FROM jobs WHERE status = 'running' AND NOT {live} ORDER BY created_at, rowid "
                              "LIMIT 1").fetchone()
        if row is not None:
            return _job(row)
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

    # --- claims: work any live worker may take (tunesmith.serve.store.claims) -----------------------------------

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

    def held_elsewhere(self, table: str, worker: str) -> set[str]:
        """Ids of ``table``'s rows another live worker holds."""
        return {r[0] for r in self.db.execute(
            f"SELECT id FROM {claimable(table)} WHERE {held()} AND claimed_by != ?", (worker,))}

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

    def checkpoint_by_model(self, name: str) -> dict | None:
        """The checkpoint whose ``fine_tuned_model_checkpoint`` is ``name``, with its job's owner."""
        row = self.db.execute("SELECT c.*, j.owner AS owner FROM checkpoints c "
                              "JOIN jobs j ON j.id = c.job_id WHERE c.fine_tuned_model_checkpoint = ?", (name,)).fetchone()
        return dict(row) if row else None

    def sampler_checkpoint_by_model(self, name: str) -> dict | None:
        """The Tinker sampler checkpoint whose ``tinker://`` path is ``name`` (served as a model of its key)."""
        from tunesmith.serve.store.tinker import TinkerStore

        ckpt = TinkerStore(self).checkpoint_any_owner(name)
        return ckpt if ckpt is not None and ckpt["kind"] == "sampler" else None

    def sampler_checkpoints_of(self, owner: str | None) -> list[dict]:
        """A key's Tinker sampler checkpoints, oldest first."""
        from tunesmith.serve.store.tinker import TinkerStore

        return TinkerStore(self).sampler_checkpoints(owner)

    def delete_checkpoint(self, name: str) -> None:
        with self.lock:
            self.db.execute("DELETE FROM checkpoints WHERE fine_tuned_model_checkpoint = ?", (name,))

    def update_checkpoint_metrics(self, job_id: str, step: int, metrics: dict) -> None:
        with self.lock:
            self.db.execute("UPDATE checkpoints SET metrics = ? WHERE job_id = ? AND step_number = ?",
                            (json.dumps(metrics), job_id, step))

    def fine_tune(self, name: str, owner: str | None) -> tuple[dict, Path] | None:
        """``name`` (a succeeded job's fine-tuned model, or one of its checkpoints' models) if it is ``owner``'s
        and its weights are still kept: (the job that made it, the folder of its adapter); else None."""
        job = self.job_by_model(name)
        if job is not None and job["owner"] == owner and job["status"] == "succeeded" and not job["model_deleted"] \
                and job.get("run_dir"):
            folder = Path(job["run_dir"]) / "train" / "adapter"
            return (job, folder) if folder.is_dir() else None
        ckpt = self.checkpoint_by_model(name)
        if ckpt is not None and ckpt["owner"] == owner and Path(ckpt["path"]).is_dir():
            return self.get_job(ckpt["job_id"], owner), Path(ckpt["path"])
        return None

    def fine_tunes_of(self, owner: str | None) -> list[dict]:
        """``owner``'s fine-tuned models that are served: succeeded jobs whose model is not deleted, oldest first."""
        return [_job(r) for r in self.db.execute(
            "SELECT * FROM jobs WHERE owner IS ? AND status = 'succeeded' AND fine_tuned_model IS NOT NULL "
            "AND model_deleted = 0 ORDER BY created_at, rowid", (owner,))]

    def fine_tunes_since(self, since: int, limit: int) -> list[dict]:
        """At most ``limit`` fine-tuned models whose jobs succeeded at or after ``since``, the newest first."""
        return [_job(r) for r in self.db.execute(
            "SELECT * FROM jobs WHERE status = 'succeeded' AND finished_at >= ? AND fine_tuned_model IS NOT NULL "
            "AND model_deleted = 0 ORDER BY finished_at DESC LIMIT ?", (since, limit))]

    def job_by_model(self, name: str) -> dict | None:
        """The job that made the fine-tuned model ``name`` (any owner: the caller checks)."""
        row = self.db.execute("SELECT * FROM jobs WHERE fine_tuned_model = ?", (name,)).fetchone()
        return _job(row) if row else None

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


def _event(row) -> dict:
    return {**dict(row), "data": json.loads(row["data"]) if row["data"] else None}


def _checkpoint(row) -> dict:
    return {**dict(row), "metrics": json.loads(row["metrics"])}
def _job(row) -> dict:
    d = dict(row)
    for key in JSON_COLUMNS:
        if d.get(key):
            d[key] = json.loads(d[key])
    return d
