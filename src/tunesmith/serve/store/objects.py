"""The server's store for files, uploads, responses and the fine-tuned models jobs made (and, through the modules
beside it and the rooms' own stores, every other object a key keeps: a job's own rows are
:class:`tunesmith.serve.jobs.store.JobStore`'s): SQLite in the data folder, or PostgreSQL
(:mod:`tunesmith.serve.store.database`).

Schema changes are named, ordered migrations recorded in ``schema_migrations``; a database is
brought up to date when opened. A migration is SQL, or a Python step called with the connection and
the data folder inside the same transaction. Every ``owner`` is an owner id (:mod:`tunesmith.serve.store.keys`),
never an API key. Ids are opaque random strings and are never used as paths:
uploaded bytes live at ``<root>/files/<random>.jsonl`` under a name the store chose.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path

from tunesmith.serve.store.claims import Claims, claimable, held
from tunesmith.serve.store.database import PostgresDatabase, SQLiteDatabase, open_database
from tunesmith.serve.store.migrations import MIGRATIONS
from tunesmith.serve.store.pages import page_rows

TINKER_SCHEME = "tinker://"  # a Tinker checkpoint's path, also the model name of a sampler checkpoint
TINKER_LIVE = "(expires_at IS NULL OR expires_at > ?)"  # a Tinker checkpoint whose TTL has not passed

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

    # --- fine-tuned models: what the jobs made, as the API serves them (the jobs' own tables' code is the jobs
    # room's, tunesmith.serve.jobs.store) ------------------------------------------------------------------

    def update_job(self, jid: str, **fields) -> None:
        for key in JSON_COLUMNS:
            if key in fields and not isinstance(fields[key], str | None):
                fields[key] = json.dumps(fields[key])
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.lock:
            self.db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", [*fields.values(), jid])

    def job_by_model(self, name: str) -> dict | None:
        """The job that made the fine-tuned model ``name`` (any owner: the caller checks)."""
        row = self.db.execute("SELECT * FROM jobs WHERE fine_tuned_model = ?", (name,)).fetchone()
        return job_row(row) if row else None

    def fine_tunes_of(self, owner: str | None) -> list[dict]:
        """``owner``'s fine-tuned models that are served: succeeded jobs whose model is not deleted, oldest first."""
        return [job_row(r) for r in self.db.execute(
            "SELECT * FROM jobs WHERE owner IS ? AND status = 'succeeded' AND fine_tuned_model IS NOT NULL "
            "AND model_deleted = 0 ORDER BY created_at, rowid", (owner,))]

    def fine_tunes_since(self, since: int, limit: int) -> list[dict]:
        """At most ``limit`` fine-tuned models whose jobs succeeded at or after ``since``, the newest first."""
        return [job_row(r) for r in self.db.execute(
            "SELECT * FROM jobs WHERE status = 'succeeded' AND finished_at >= ? AND fine_tuned_model IS NOT NULL "
            "AND model_deleted = 0 ORDER BY finished_at DESC LIMIT ?", (since, limit))]

    def checkpoint_by_model(self, name: str) -> dict | None:
        """The checkpoint whose ``fine_tuned_model_checkpoint`` is ``name``, with its job's owner."""
        row = self.db.execute("SELECT c.*, j.owner AS owner FROM checkpoints c "
                              "JOIN jobs j ON j.id = c.job_id WHERE c.fine_tuned_model_checkpoint = ?", (name,)).fetchone()
        return dict(row) if row else None

    def delete_checkpoint(self, name: str) -> None:
        with self.lock:
            self.db.execute("DELETE FROM checkpoints WHERE fine_tuned_model_checkpoint = ?", (name,))

    def sampler_checkpoint_by_model(self, name: str) -> dict | None:
        """The Tinker sampler checkpoint whose ``tinker://`` path is ``name`` (served as a model of its key), not
        expired. (The Tinker room's own rows are its ``tinker/store.py``'s; these two reads are the OpenAI side's.)"""
        row = self.db.execute(f"SELECT path, owner, folder FROM tinker_checkpoints WHERE path = ? AND kind = 'sampler' "
                              f"AND {TINKER_LIVE}", (name, int(time.time()))).fetchone()
        return dict(row) if row else None

    def sampler_checkpoints_of(self, owner: str | None) -> list[dict]:
        """A key's Tinker sampler checkpoints, oldest first."""
        return [dict(r) for r in self.db.execute(
            f"SELECT path, owner, folder FROM tinker_checkpoints WHERE owner IS ? AND kind = 'sampler' AND "
            f"{TINKER_LIVE} ORDER BY created_at, path", (owner, int(time.time()))).fetchall()]

    # --- claims: work any live worker may take (tunesmith.serve.store.claims) -----------------------------------

    def held_elsewhere(self, table: str, worker: str) -> set[str]:
        """Ids of ``table``'s rows another live worker holds."""
        return {r[0] for r in self.db.execute(
            f"SELECT id FROM {claimable(table)} WHERE {held()} AND claimed_by != ?", (worker,))}


def job_row(row) -> dict:
    """A row of ``jobs`` as a job: its JSON columns read."""
    d = dict(row)
    for key in JSON_COLUMNS:
        if d.get(key):
            d[key] = json.loads(d[key])
    return d
