"""The Tinker room's rows (tables of the store's migrations 0055-0058 and 0066-0067): training runs, each created
claimed by the replica that holds its adapter in memory, and their checkpoints under ``tinker://<run>/weights/<name>``
(a training state) or ``tinker://<run>/sampler_weights/<name>`` (weights to sample from: also a model of the key on
the OpenAI API).
Every row belongs to the key that made it; another key's are not found."""

from __future__ import annotations

import json
import re
import time
from typing import TYPE_CHECKING

from tunesmith.serve.store.claims import Claim, free
from tunesmith.serve.store.objects import TINKER_LIVE, TINKER_SCHEME

if TYPE_CHECKING:
    from tunesmith.serve.store.objects import Store

SESSION_ID = re.compile(r"session-[0-9a-f]{24}")  # a client session's id (made by create_session)
RUN_ID = re.compile(r"session-[0-9a-f]{24}:train:[0-9]{1,10}")  # a training run's: <session>:train:<model_seq_id>
NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")  # a checkpoint's name: a folder, never '.' or '..'
SCHEME = TINKER_SCHEME
KINDS = {"weights": "training", "sampler_weights": "sampler"}  # a path's segment -> the SDK's checkpoint_type
LIVE = TINKER_LIVE
LOGGED, ENDED = "tinker_logged", "tinker_ended"  # the store's notifications: a call logged, a future ended


def run_name(session_id: str, seq) -> str:
    """A training run's id: the SDK's ``<session>:train:<n>`` (the ``n``-th training client of a client session)."""
    return f"{session_id}:train:{seq}"


def run_session(run_id: str) -> str:
    """The client session a training run's id names."""
    return run_id.partition(":train:")[0]


def checkpoint_path(run_id: str, kind: str, name: str) -> str:
    return f"{SCHEME}{run_id}/{kind}/{name}"


def parse_path(path: str) -> tuple[str, str, str] | None:
    """(run id, kind segment, name) of a ``tinker://`` checkpoint path; None for anything else: its run id must be
    one the server makes (:data:`RUN_ID`) and its name a checkpoint name (:data:`NAME`), so that no part of a path a
    client sends can name a folder other than the one the server would make."""
    if not isinstance(path, str) or not path.startswith(SCHEME):
        return None
    parts = path[len(SCHEME):].split("/")
    if len(parts) != 3 or parts[1] not in KINDS or not RUN_ID.fullmatch(parts[0]) or not NAME.fullmatch(parts[2]):
        return None
    return parts[0], parts[1], parts[2]


class TinkerStore:
    def __init__(self, store: Store):
        self.db, self.lock, self.base = store.db, store.lock, store

    def add_run(self, rid: str, owner: str | None, holder: str, base_model: str, lora: dict,
                metadata: dict | None) -> tuple[dict, Claim]:
        """A new training run ``rid`` created claimed by ``holder`` (the replica that will hold its adapter)."""
        now = int(time.time())
        with self.lock:
            claim = self.base.claims.insert("tinker_runs", {
                "id": rid, "owner": owner, "base_model": base_model, "lora": json.dumps(lora),
                "metadata": json.dumps(metadata), "created_at": now, "last_request_at": now}, holder)
        return self.get_run(rid, owner), claim

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

    def checkpoint_bytes(self, owner: str | None) -> int:
        """Bytes on disk of the checkpoints ``owner`` keeps."""
        return int(self.db.execute(f"SELECT COALESCE(SUM(size_bytes), 0) FROM tinker_checkpoints WHERE owner IS ? AND "
                                   f"{LIVE}", (owner, int(time.time()))).fetchone()[0])

    def expired(self, limit: int = 100) -> list[dict]:
        """Checkpoints whose TTL has passed (their folders to remove, then their rows)."""
        return [_ckpt(r) for r in self.db.execute("SELECT * FROM tinker_checkpoints WHERE expires_at IS NOT NULL AND "
                                                  "expires_at <= ? LIMIT ?", (int(time.time()), limit)).fetchall()]

    def forget_checkpoint(self, path: str) -> None:
        with self.lock:
            self.db.execute("DELETE FROM tinker_checkpoints WHERE path = ?", (path,))

    # --- client sessions ---

    def add_session(self, sid: str, owner: str | None, keep: int) -> None:
        """A client session of ``owner``'s; past ``keep`` of the key's, its oldest are forgotten."""
        with self.lock:
            self.db.execute("INSERT INTO tinker_sessions (id, owner, created_at) VALUES (?, ?, ?)",
                            (sid, owner, time.time()))
            self._forget_past("tinker_sessions", "created_at", owner, keep)

    def session(self, sid: str, owner: str | None) -> dict | None:
        """A client session of ``owner``'s (None for another key's or an unknown id)."""
        row = self.db.execute("SELECT * FROM tinker_sessions WHERE id = ? AND owner IS ?", (sid, owner)).fetchone()
        return None if row is None else dict(row)

    def finished_sessions(self, sids: set[str]) -> set[str]:
        """Those of client sessions ``sids`` that were finished."""
        if not sids:
            return set()
        return {r["id"] for r in self.db.execute(f"SELECT id FROM tinker_sessions WHERE id IN "
                                                 f"({', '.join('?' * len(sids))}) AND finished_at IS NOT NULL",
                                                 tuple(sids)).fetchall()}

    def finish_session(self, sid: str, owner: str | None) -> None:
        with self.lock:
            self.db.execute("UPDATE tinker_sessions SET finished_at = ? WHERE id = ? AND owner IS ? AND finished_at IS "
                            "NULL", (time.time(), sid, owner))

    # --- sampling sessions and recorded samples ---

    def add_sampling_session(self, sid: str, owner: str | None, session_id: str, model_path: str | None,
                             keep: int) -> None:
        """A sampling session of ``owner``'s; past ``keep`` of the key's, its oldest are forgotten."""
        with self.lock:
            self.db.execute("INSERT INTO tinker_sampling_sessions (id, owner, session_id, model_path, created_at) "
                            "VALUES (?, ?, ?, ?, ?)", (sid, owner, session_id, model_path, time.time()))
            self._forget_past("tinker_sampling_sessions", "created_at", owner, keep)

    def sampling_session(self, sid: str, owner: str | None) -> dict | None:
        row = self.db.execute("SELECT * FROM tinker_sampling_sessions WHERE id = ? AND owner IS ?",
                              (sid, owner)).fetchone()
        return None if row is None else dict(row)

    def add_samples(self, rid: str, owner: str | None, session_id: str, prompt: list[int],
                    sequences: list[dict], keep_s: float, keep: int) -> None:
        """One sample request's prompt and sequences (``{"tokens", "logprobs"}`` each), recorded; the key's records
        unused for ``keep_s`` seconds, and its oldest past ``keep``, forgotten."""
        now = time.time()
        with self.lock:
            self.db.execute("INSERT INTO tinker_samples (id, owner, session_id, prompt, sequences, used_at) VALUES "
                            "(?, ?, ?, ?, ?, ?)", (rid, owner, session_id, json.dumps(prompt), json.dumps(sequences),
                                                   now))
            self.db.execute("DELETE FROM tinker_samples WHERE owner IS ? AND used_at < ?", (owner, now - keep_s))
            self._forget_past("tinker_samples", "used_at", owner, keep)

    def _forget_past(self, table: str, newest: str, owner: str | None, keep: int) -> None:
        """Under the lock: ``owner``'s rows of ``table`` past its ``keep`` newest (by ``newest``) deleted."""
        self.db.execute(f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE owner IS ? ORDER BY {newest} "
                        "DESC, id DESC LIMIT ? OFFSET ?)", (owner, 1 << 62, keep))

    def samples(self, rids: list[str], owner: str | None, keep_s: float) -> dict[str, dict]:
        """The recorded sample requests of ``owner`` among ``rids`` still kept (their day restarted: used now)."""
        if not rids:
            return {}
        now, marks = time.time(), ", ".join("?" * len(rids))
        with self.lock:
            rows = self.db.execute(f"SELECT * FROM tinker_samples WHERE id IN ({marks}) AND owner IS ? AND used_at >= "
                                   "?", (*rids, owner, now - keep_s)).fetchall()
            found = {r["id"]: {"session_id": r["session_id"], "prompt": json.loads(r["prompt"]),
                               "sequences": json.loads(r["sequences"])} for r in rows}
            if found:
                self.db.execute(f"UPDATE tinker_samples SET used_at = ? WHERE id IN ({', '.join('?' * len(found))})",
                                (now, *found))
        return found

    # --- futures ---

    def present(self, holder: str) -> Claim:
        """``holder``'s Tinker presence: its row of ``tinker_replicas`` claimed (a new generation), renewed by the
        heartbeat while the process lives."""
        with self.lock:
            self.db.execute("INSERT INTO tinker_replicas (id) VALUES (?) ON CONFLICT (id) DO NOTHING", (holder,))
        return self.base.claims.acquire("tinker_replicas", holder, holder, force=True)

    def add_future(self, rid: str, owner: str | None, kind: str, presence: Claim) -> None:
        with self.lock:
            self.db.execute("INSERT INTO tinker_futures (id, owner, kind, holder, holder_generation, created_at) VALUES "
                            "(?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                            (rid, owner, kind, presence.holder, presence.generation, time.time()))

    def end_future(self, rid: str, owner: str | None, kind: str, presence: Claim, error: tuple[str, str] | None,
                   answer_kind: str | None, answer_file: str | None) -> None:
        """The future's end: its error (message, category) or where its answer is (whether its row was written yet)."""
        message, category = error or (None, None)
        now = time.time()
        with self.lock:
            self.db.execute("INSERT INTO tinker_futures (id, owner, kind, holder, holder_generation, created_at, "
                            "ended_at, error, category, answer_kind, answer_file) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                            "?) ON CONFLICT (id) DO UPDATE SET ended_at = excluded.ended_at, error = excluded.error, "
                            "category = excluded.category, answer_kind = excluded.answer_kind, answer_file = "
                            "excluded.answer_file", (rid, owner, kind, presence.holder, presence.generation, now, now,
                                                     message, category, answer_kind, answer_file))
        self.db.notify(ENDED, rid)  # the replica a client polls for it hears it at once

    def future(self, rid: str, owner: str | None) -> dict | None:
        """A future of ``owner``'s, with ``holder_gone`` true when the replica that took it stopped (its presence's
        lease ran out, or it started again) before its end, and ``logged`` true for a call of a run's command log
        (answered by whichever replica holds the run, or takes it over)."""
        row = self.db.execute(f"SELECT f.*, ({free('r')} OR r.generation <> f.holder_generation) AS holder_gone, "
                              "EXISTS (SELECT 1 FROM tinker_commands c WHERE c.rid = f.id) AS logged FROM "
                              "tinker_futures f LEFT JOIN tinker_replicas r ON r.id = f.holder WHERE f.id = ? AND "
                              "f.owner IS ?", (rid, owner)).fetchone()
        return None if row is None else dict(row)

    def expired_futures(self, before: float, limit: int = 1000) -> list[dict]:
        """Futures ended before ``before`` (their answer files to remove, then their rows)."""
        return [dict(r) for r in self.db.execute("SELECT id, answer_file FROM tinker_futures WHERE ended_at < ? LIMIT ?",
                                                 (before, limit)).fetchall()]

    def forget_futures(self, rids: list[str]) -> None:
        if rids:
            marks = ", ".join("?" * len(rids))
            with self.db.transaction():
                self.db.execute(f"DELETE FROM tinker_futures WHERE id IN ({marks})", tuple(rids))
                self.db.execute(f"DELETE FROM tinker_commands WHERE rid IN ({marks})", tuple(rids))

    # --- the command log ---

    def log_command(self, run_id: str, seq: int | None, rid: str, owner: str | None, kind: str, args: list,
                    body_bytes: int, presence: Claim, most: int, most_bytes: int) -> str:
        """A run's call written to its command log with its future's row, in one transaction: the id of the future
        that answers it (an earlier one's when ``seq`` was logged already: the SDK's retry). ``seq`` None: the next
        after the run's last. A :class:`TooManyCommands` when ``owner``'s logged calls not answered yet would be more
        than ``most``, or their bodies more than ``most_bytes``."""
        with self.db.transaction():
            self.db.serialize(f"tinker_commands:{run_id}")
            if seq is None:
                seq = int(self.db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM tinker_commands WHERE run_id = ?",
                                          (run_id,)).fetchone()[0])
            row = self.db.execute("SELECT rid FROM tinker_commands WHERE run_id = ? AND seq = ?",
                                  (run_id, seq)).fetchone()
            if row is not None:
                return row["rid"]
            waiting, held = self.db.execute("SELECT COUNT(*), COALESCE(SUM(c.body_bytes), 0) FROM tinker_commands c "
                                            "JOIN tinker_futures f ON f.id = c.rid WHERE c.owner IS ? AND f.ended_at "
                                            "IS NULL", (owner,)).fetchone()
            if int(waiting) >= most or int(held) + body_bytes > most_bytes:
                raise TooManyCommands(int(waiting), int(held))
            self.db.execute("INSERT INTO tinker_commands (run_id, seq, rid, owner, kind, args, body_bytes, created_at) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (run_id, seq, rid, owner, kind, json.dumps(args),
                                                                body_bytes, time.time()))
            self.add_future(rid, owner, kind, presence)
            self.db.notify(LOGGED, run_id)  # sent at the commit: the run's holder hears it and reads the call
        return rid

    def listen(self, heard):
        """``heard(channel, payload)`` (from a thread of its own) for each call logged (:data:`LOGGED`, its run's id)
        and each future ended (:data:`ENDED`, its id) by any replica; ``heard(None, None)`` when some may have been
        missed. None where nothing is to be heard (one server on SQLite)."""
        return self.db.listen((LOGGED, ENDED), heard)

    def logged(self, run_ids: list[str]) -> list[dict]:
        """The calls of runs ``run_ids`` not answered yet, each run's in seq order."""
        if not run_ids:
            return []
        rows = self.db.execute(f"SELECT c.run_id, c.seq, c.rid, c.owner, c.kind, c.args FROM tinker_commands c JOIN "
                               f"tinker_futures f ON f.id = c.rid WHERE c.run_id IN ({', '.join('?' * len(run_ids))}) "
                               "AND f.ended_at IS NULL ORDER BY c.run_id, c.seq", tuple(run_ids)).fetchall()
        return [dict(r) | {"args": json.loads(r["args"])} for r in rows]

    def orphaned(self, limit: int = 100) -> list[dict]:
        """Runs with calls waiting in their log that nobody holds (their replica stopped, or let them go): their id
        and key."""
        return [dict(r) for r in self.db.execute(
            f"SELECT DISTINCT r.id, r.owner FROM tinker_commands c JOIN tinker_futures f ON f.id = c.rid JOIN "
            f"tinker_runs r ON r.id = c.run_id WHERE f.ended_at IS NULL AND {free('r')} LIMIT ?", (limit,)).fetchall()]

    def delete_checkpoint(self, path: str, owner: str | None) -> bool:
        with self.lock:
            return self.db.execute("DELETE FROM tinker_checkpoints WHERE path = ? AND owner IS ?",
                                   (path, owner)).rowcount > 0


class TooManyCommands(Exception):
    """A key has too many logged calls not answered yet (their count and their bodies' bytes in ``args``)."""


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
