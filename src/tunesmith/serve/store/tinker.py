"""The Tinker API's rows (tunesmith.serve.tinker; tables of migrations 0055-0058): training runs, each created
claimed by the replica that holds its adapter in memory, and their checkpoints under ``tinker://<run>/weights/<name>``
(a training state) or ``tinker://<run>/sampler_weights/<name>`` (weights to sample from: also a model of the key on
the OpenAI API).
Every row belongs to the key that made it; another key's are not found."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from tunesmith.serve.store.claims import LEASE_S, Claim
from tunesmith.serve.store.database import NOW

if TYPE_CHECKING:
    from tunesmith.serve.store.objects import Store

SCHEME = "tinker://"
KINDS = {"weights": "training", "sampler_weights": "sampler"}  # a path's segment -> the SDK's checkpoint_type
LIVE = "(expires_at IS NULL OR expires_at > ?)"  # a checkpoint whose TTL has not passed


def checkpoint_path(run_id: str, kind: str, name: str) -> str:
    return f"{SCHEME}{run_id}/{kind}/{name}"


def parse_path(path: str) -> tuple[str, str, str] | None:
    """(run id, kind segment, name) of a ``tinker://`` checkpoint path; None for anything else."""
    if not path.startswith(SCHEME):
        return None
    parts = path[len(SCHEME):].split("/")
    if len(parts) != 3 or parts[1] not in KINDS or not parts[0] or not parts[2]:
        return None
    return parts[0], parts[1], parts[2]


class TinkerStore:
    def __init__(self, store: Store):
        self.db, self.lock, self.base = store.db, store.lock, store

    def add_run(self, rid: str, owner: str | None, holder: str, base_model: str, lora: dict,
                metadata: dict | None) -> tuple[dict, Claim]:
        """A new training run ``rid`` created claimed by ``holder`` (the replica that will hold its adapter)."""
        since, now = time.monotonic(), int(time.time())
        with self.lock:
            self.db.execute("INSERT INTO tinker_runs (id, owner, base_model, lora, metadata, created_at, "
                            f"last_request_at, claimed_by, generation, lease_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?, "
                            f"1, {NOW} + ?)", (rid, owner, base_model, json.dumps(lora), json.dumps(metadata), now,
                                               now, holder, LEASE_S))
        return self.get_run(rid, owner), self.base.claims.adopt("tinker_runs", rid, holder, 1, since)

    def get_run(self, rid: str, owner: str | None) -> dict | None:
        row = self.db.execute("SELECT * FROM tinker_runs WHERE id = ? AND owner IS ?", (rid, owner)).fetchone()
        return _run(row)

    def list_runs(self, owner: str | None, limit: int, offset: int) -> tuple[list[dict], int]:
        rows = self.db.execute("SELECT * FROM tinker_runs WHERE owner IS ? ORDER BY created_at DESC, id LIMIT ? "
                               "OFFSET ?", (owner, limit, offset)).fetchall()
        total = self.db.execute("SELECT COUNT(*) FROM tinker_runs WHERE owner IS ?", (owner,)).fetchone()[0]
        return [_run(r) for r in rows], int(total)

    def touch(self, rid: str) -> None:
        with self.lock:
            self.db.execute("UPDATE tinker_runs SET last_request_at = ? WHERE id = ?", (int(time.time()), rid))

    def add_checkpoint(self, path: str, owner: str | None, folder: str, size_bytes: int, metadata: dict | None,
                       ttl_s: int | None) -> None:
        run_id, kind, name = parse_path(path)
        now = int(time.time())
        with self.lock:
            self.db.execute("DELETE FROM tinker_checkpoints WHERE path = ?", (path,))
            self.db.execute("INSERT INTO tinker_checkpoints (path, run_id, owner, kind, name, folder, size_bytes, "
                            "metadata, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (path, run_id, owner, KINDS[kind], name, folder, size_bytes, json.dumps(metadata), now,
                             None if ttl_s is None else now + ttl_s))

    def checkpoint(self, path: str, owner: str | None) -> dict | None:
        """A checkpoint of ``owner`` that has not expired."""
        return _ckpt(self.db.execute(f"SELECT * FROM tinker_checkpoints WHERE path = ? AND owner IS ? AND {LIVE}",
                                     (path, owner, int(time.time()))).fetchone())

    def checkpoint_any_owner(self, path: str) -> dict | None:
        """A checkpoint by path whoever owns it, not expired (model resolution checks the owner itself)."""
        return _ckpt(self.db.execute(f"SELECT * FROM tinker_checkpoints WHERE path = ? AND {LIVE}",
                                     (path, int(time.time()))).fetchone())

    def checkpoints(self, run_id: str, owner: str | None) -> list[dict]:
        return [_ckpt(r) for r in self.db.execute(f"SELECT * FROM tinker_checkpoints WHERE run_id = ? AND owner IS ? "
                                                  f"AND {LIVE} ORDER BY created_at, path",
                                                  (run_id, owner, int(time.time()))).fetchall()]

    def checkpoints_page(self, owner: str | None, limit: int, offset: int) -> tuple[list[dict], int]:
        """One page of a key's checkpoints, newest first, and how many it keeps."""
        now = int(time.time())
        rows = self.db.execute(f"SELECT * FROM tinker_checkpoints WHERE owner IS ? AND {LIVE} ORDER BY created_at DESC, "
                               "path LIMIT ? OFFSET ?", (owner, now, limit, offset)).fetchall()
        return [_ckpt(r) for r in rows], self.count_checkpoints(owner)

    def count_checkpoints(self, owner: str | None) -> int:
        return int(self.db.execute(f"SELECT COUNT(*) FROM tinker_checkpoints WHERE owner IS ? AND {LIVE}",
                                   (owner, int(time.time()))).fetchone()[0])

    def sampler_checkpoints(self, owner: str | None) -> list[dict]:
        return [_ckpt(r) for r in self.db.execute(f"SELECT * FROM tinker_checkpoints WHERE owner IS ? AND kind = "
                                                  f"'sampler' AND {LIVE} ORDER BY created_at, path",
                                                  (owner, int(time.time()))).fetchall()]

    def expired(self, limit: int = 100) -> list[dict]:
        """Checkpoints whose TTL has passed (their folders to remove, then their rows)."""
        return [_ckpt(r) for r in self.db.execute("SELECT * FROM tinker_checkpoints WHERE expires_at IS NOT NULL AND "
                                                  "expires_at <= ? LIMIT ?", (int(time.time()), limit)).fetchall()]

    def forget_checkpoint(self, path: str) -> None:
        with self.lock:
            self.db.execute("DELETE FROM tinker_checkpoints WHERE path = ?", (path,))

    def delete_checkpoint(self, path: str, owner: str | None) -> bool:
        with self.lock:
            return self.db.execute("DELETE FROM tinker_checkpoints WHERE path = ? AND owner IS ?",
                                   (path, owner)).rowcount > 0


def _run(row) -> dict | None:
    if row is None:
        return None
    d = dict(row)
    d["lora"], d["metadata"] = json.loads(d["lora"]), json.loads(d["metadata"] or "null")
    return d


def _ckpt(row) -> dict | None:
    if row is None:
        return None
    d = dict(row)
    d["metadata"] = json.loads(d["metadata"] or "null")
    return d
