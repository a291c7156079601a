"""Batches, their chunks and their answered lines in the server's store (migrations 0019-0020, 0031-0032,
0049-0050). A batch belongs to the key that created it. Its requests are split into chunks of a fixed number of
lines when it starts (``batch_chunks``), each claimed by one replica at a time with a lease, as jobs are; each
answered line is recorded (its number and status; the answer itself is in its chunk's part file,
:mod:`tunesmith.serve.batches.output`) with the chunk's part files' lengths, in one transaction, so a chunk whose
replica stopped or died goes on, on any replica, with the lines it has not answered. Who finishes a batch (assembles
its files from the parts and gives it its final status) is decided once, in one transaction per batch.

A batch run by chunks is claimed for good by :data:`CHUNKED` (``batches.claimed_by``): a replica of the release
before, which claims whole batches, leaves it alone while an upgrade runs."""

from __future__ import annotations

import json
import time

from tunesmith.serve.store import LEASE_S, Store, new_id
from tunesmith.serve.store.pages import page_rows

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
CHUNKED = "chunks"  # batches.claimed_by of a batch run chunk by chunk
FOREVER = 1e15  # its lease: a time no clock reaches


class ClaimLost(Exception):
    """A replica's claim on a chunk (or on a batch's finishing) is no longer its own: nothing was recorded."""


class BatchStore:
    def __init__(self, store: Store):
        self.db, self.lock = store.db, store.lock

    def add(self, owner: str | None, endpoint: str, input_file_id: str, metadata: dict | None, total: int,
            model: str | None, window_s: int, output_expires_s: int | None = None) -> dict:
        bid, now = new_id("batch"), int(time.time())
        with self.lock:
            self.db.execute("INSERT INTO batches (id, owner, endpoint, input_file_id, completion_window, status, "
                            "metadata, model, total, created_at, expires_at, output_expires_s) VALUES (?, ?, ?, ?, "
                            "'24h', 'validating', ?, ?, ?, ?, ?, ?)",
                            (bid, owner, endpoint, input_file_id, json.dumps(metadata), model, total, now,
                             now + window_s, output_expires_s))
        return self.get(bid, owner)

    def get(self, bid: str, owner: str | None = None, any_owner: bool = False) -> dict | None:
        sql, args = "SELECT * FROM batches WHERE id = ?", [bid]
        if not any_owner:
            sql, args = sql + " AND owner IS ?", [*args, owner]
        row = self.db.execute(sql, args).fetchone()
        return self._with_counts(dict(row)) if row else None

    def list(self, owner: str | None, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        """One page of the owner's batches, newest first, and whether more follow."""
        rows, more = page_rows(self.db, "batches", "owner IS ?", [owner], ("created_at", "rowid"), after, limit)
        return [self._with_counts(dict(r)) for r in rows], more

    def active(self) -> list[dict]:
        """Batches still to answer or finish, oldest first (the runner's work, after a restart too)."""
        marks = ", ".join("?" * len(ACTIVE))
        rows = self.db.execute(f"SELECT * FROM batches WHERE status IN ({marks}) ORDER BY created_at, rowid", ACTIVE)
        return [self._with_counts(dict(r)) for r in rows]

    def update(self, bid: str, **fields) -> None:
        if not fields:
            return
        fields = {k: json.dumps(v) if k == "errors" else v for k, v in fields.items()}
        with self.lock:
            self.db.execute(f"UPDATE batches SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?",
                            [*fields.values(), bid])

    def mark(self, bid: str, status: str) -> None:
        """A new status, with its time (``in_progress_at``, ``completed_at``…)."""
        self.update(bid, status=status, **{f"{status}_at": int(time.time())})

    def add_result(self, bid: str, line: int, custom_id: str, status_code: int, output_bytes: int,
                   error_bytes: int) -> None:
        """One line answered (its answer already appended to the batch's file) and the files' lengths now, in one
        transaction: a restart cuts the files back to these lengths."""
        with self.db.transaction():
            self.db.execute("INSERT INTO batch_results VALUES (?, ?, ?, ?, '') ON CONFLICT (batch_id, line) DO UPDATE "
                            "SET custom_id = excluded.custom_id, status_code = excluded.status_code, body = ''",
                            (bid, line, custom_id, status_code))
            self.db.execute("UPDATE batches SET output_bytes = ?, error_bytes = ? WHERE id = ?",
                            (output_bytes, error_bytes, bid))

    def fail(self, bid: str, errors: list[dict]) -> None:
        """The batch failed with ``errors``; its claims let go."""
        with self.db.transaction():
            self.update(bid, errors=errors, claimed_by=None, lease_until=None)
            self.mark(bid, "failed")

    def final_status(self, bid: str) -> str:
        """What a batch that ends now ends as: cancelled once cancelled, else completed when every line is answered,
        else expired."""
        row = self.get(bid, any_owner=True)
        counts = row["request_counts"]
        if row["status"] == "cancelling" or row["cancelling_at"] is not None:
            return "cancelled"
        return "completed" if counts["completed"] + counts["failed"] >= row["total"] else "expired"

    def finished(self, bid: str, status: str, files: dict[str, str]) -> None:
        """The batch's final ``status`` and its output and error file ids (``files``); every claim on it let go."""
        self.update(bid, **files, claimed_by=None, lease_until=None)
        self.mark(bid, status)
        with self.lock:
            self.db.execute("UPDATE batch_chunks SET claimed_by = NULL, lease_until = NULL WHERE batch_id = ?", (bid,))

    # --- chunks: a batch's lines answered by any replica -----------------------------------------------------

    def add_chunks(self, bid: str, bounds: list[tuple[int, int, int, int]], holder: str) -> bool:
        """The batch's chunks (each: first line, lines spanned, first byte, requests) recorded and the batch marked
        run by chunks (and in progress), in one transaction, while ``holder`` holds the batch's claim; False (nothing
        recorded) when it no longer does."""
        rows = [(f"{bid}.{n}", bid, n, *bound, "pending") for n, bound in enumerate(bounds)]
        try:
            with self.db.transaction():
                self.db.executemany("INSERT OR IGNORE INTO batch_chunks (id, batch_id, chunk, first_line, lines, "
                                    "first_byte, requests, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
                if self.db.execute("UPDATE batches SET claimed_by = ?, lease_until = ?, in_progress_at = CASE WHEN "
                                   "status = 'validating' THEN ? ELSE in_progress_at END, status = CASE WHEN status = "
                                   "'validating' THEN 'in_progress' ELSE status END WHERE id = ? AND claimed_by = ?",
                                   (CHUNKED, FOREVER, int(time.time()), bid, holder)).rowcount != 1:
                    raise ClaimLost(bid)
        except ClaimLost:
            return False
        return True

    def chunks(self, bid: str) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM batch_chunks WHERE batch_id = ? ORDER BY chunk", (bid,))]

    def claim_chunk(self, bid: str, holder: str) -> dict | None:
        """The batch's first chunk still to answer that no live replica holds, claimed for ``holder`` while the batch
        is in progress (the claim's conditional UPDATE: of replicas claiming at once, one gets each chunk); None when
        there is none."""
        now = time.time()
        free = [r[0] for r in self.db.execute("SELECT id FROM batch_chunks WHERE batch_id = ? AND status = 'pending' "
                                              "AND (claimed_by IS NULL OR lease_until < ?) ORDER BY chunk", (bid, now))]
        for cid in free:
            with self.lock:
                took = self.db.execute(
                    "UPDATE batch_chunks SET claimed_by = ?, lease_until = ? WHERE id = ? AND status = 'pending' AND "
                    "(claimed_by IS NULL OR lease_until < ?) AND EXISTS (SELECT 1 FROM batches WHERE id = ? AND "
                    "status = 'in_progress')", (holder, now + LEASE_S, cid, now, bid)).rowcount
            if took == 1:
                return dict(self.db.execute("SELECT * FROM batch_chunks WHERE id = ?", (cid,)).fetchone())
        return None

    def add_chunk_result(self, chunk: dict, line: int, custom_id: str, status_code: int, output_bytes: int,
                         error_bytes: int, holder: str) -> None:
        """One line of ``chunk`` answered (its answer already appended to the chunk's part file) and the part
        files' lengths now, in one transaction, while ``holder`` holds the chunk; :class:`ClaimLost` (nothing
        recorded) when it does not: the replica that took the chunk over cuts the part back to what was recorded."""
        with self.db.transaction():
            if self.db.execute("UPDATE batch_chunks SET output_bytes = ?, error_bytes = ? WHERE id = ? AND "
                               "claimed_by = ?", (output_bytes, error_bytes, chunk["id"], holder)).rowcount != 1:
                raise ClaimLost(chunk["id"])
            self.db.execute("INSERT INTO batch_results VALUES (?, ?, ?, ?, '') ON CONFLICT (batch_id, line) DO UPDATE "
                            "SET custom_id = excluded.custom_id, status_code = excluded.status_code, body = ''",
                            (chunk["batch_id"], line, custom_id, status_code))

    def answered_in(self, chunk: dict) -> set[int]:
        """The lines of ``chunk`` answered (by any replica, or by an earlier version before the chunks)."""
        return {r[0] for r in self.db.execute(
            "SELECT line FROM batch_results WHERE batch_id = ? AND line >= ? AND line < ?",
            (chunk["batch_id"], chunk["first_line"], chunk["first_line"] + chunk["lines"]))}

    def chunk_done(self, chunk: dict, holder: str) -> bool:
        """``chunk`` marked answered (and its claim let go) if every one of its requests is recorded and ``holder``
        holds it."""
        with self.lock:
            return self.db.execute(
                "UPDATE batch_chunks SET status = 'done', answered_by = claimed_by, claimed_by = NULL, lease_until = "
                "NULL WHERE id = ? AND claimed_by = ? AND requests <= (SELECT COUNT(*) FROM batch_results WHERE "
                "batch_id = ? AND line >= ? AND line < ?)",
                (chunk["id"], holder, chunk["batch_id"], chunk["first_line"],
                 chunk["first_line"] + chunk["lines"])).rowcount == 1

    def chunk_states(self, bids: list[str]) -> dict[str, tuple[int, int]]:
        """(chunks still to answer, chunks a live replica holds) of each of these batches (none: (0, 0))."""
        if not bids:
            return {}
        marks = ", ".join("?" * len(bids))
        rows = self.db.execute("SELECT batch_id, SUM(CASE WHEN status = 'pending' THEN 1 ELSE 0 END), SUM(CASE WHEN "
                               "claimed_by IS NOT NULL AND lease_until >= ? THEN 1 ELSE 0 END) FROM batch_chunks "
                               f"WHERE batch_id IN ({marks}) GROUP BY batch_id", (time.time(), *bids))
        return {bid: (0, 0) for bid in bids} | {r[0]: (int(r[1] or 0), int(r[2] or 0)) for r in rows}

    def begin_finishing(self, bid: str, holder: str) -> tuple[str, list[dict]] | None:
        """Whether ``holder`` finishes the batch run by chunks, decided once over every replica: in one transaction
        that finishers of one batch take one at a time, when no live replica holds a chunk of it and nothing is left
        to answer (every chunk answered, or the batch cancelled, past its window, or already finalizing and its
        finisher dead), every chunk is claimed for ``holder`` and the batch marked finalizing. Returns (its final
        status, its chunks in order), or None: not now, or another's."""
        now = time.time()
        try:
            with self.db.transaction():
                self.db.serialize(f"batch {bid}")
                batch = self.db.execute("SELECT status, claimed_by, expires_at, cancelling_at FROM batches "
                                        "WHERE id = ?", (bid,)).fetchone()
                if batch is None or batch["claimed_by"] != CHUNKED or batch["status"] not in ACTIVE:
                    return None
                count, pending, held = self.db.execute(
                    "SELECT COUNT(*), SUM(CASE WHEN status = 'pending' THEN 1 ELSE 0 END), SUM(CASE WHEN claimed_by IS "
                    "NOT NULL AND lease_until >= ? THEN 1 ELSE 0 END) FROM batch_chunks WHERE batch_id = ?",
                    (now, bid)).fetchone()
                ended = batch["status"] in ("cancelling", "finalizing") or batch["cancelling_at"] is not None \
                    or now > (batch["expires_at"] or now)
                if held or (pending and not ended):
                    return None
                if self.db.execute("UPDATE batch_chunks SET claimed_by = ?, lease_until = ? WHERE batch_id = ? AND "
                                   "(claimed_by IS NULL OR lease_until IS NULL OR lease_until < ?)",
                                   (holder, now + LEASE_S, bid, now)).rowcount != count:
                    raise ClaimLost(bid)  # a chunk claimed meanwhile: its replica answers it first
                self.db.execute("UPDATE batches SET status = 'finalizing', finalizing_at = COALESCE(finalizing_at, ?) "
                                "WHERE id = ?", (int(now), bid))
                return self.final_status(bid), self.chunks(bid)
        except ClaimLost:
            return None

    def finishing_held(self, bid: str, holder: str, chunked: bool) -> bool:
        """Inside the transaction that ends the batch: whether ``holder`` still finishes it (every chunk still claimed
        by it; a batch not run by chunks: its claim), waiting for any other finisher of it first."""
        self.db.serialize(f"batch {bid}")
        if not chunked:
            row = self.db.execute("SELECT claimed_by, status FROM batches WHERE id = ?", (bid,)).fetchone()
            return row is not None and row["claimed_by"] == holder and row["status"] in ACTIVE
        others = self.db.execute("SELECT COUNT(*) FROM batch_chunks WHERE batch_id = ? AND (claimed_by IS NULL OR "
                                 "claimed_by != ?)", (bid, holder)).fetchone()[0]
        status = self.db.execute("SELECT status FROM batches WHERE id = ?", (bid,)).fetchone()
        return not others and status is not None and status[0] == "finalizing"

    def renew_finishing(self, bid: str, holder: str) -> bool:
        """The leases of ``holder`` on the chunks of the batch it finishes extended; False once it holds none."""
        with self.lock:
            return self.db.execute("UPDATE batch_chunks SET lease_until = ? WHERE batch_id = ? AND claimed_by = ?",
                                   (time.time() + LEASE_S, bid, holder)).rowcount > 0

    def let_go(self, bid: str, holder: str) -> None:
        """Every claim of ``holder`` on the batch's chunks let go (a finishing cut short by a stop)."""
        with self.lock:
            self.db.execute("UPDATE batch_chunks SET claimed_by = NULL, lease_until = NULL WHERE batch_id = ? AND "
                            "claimed_by = ?", (bid, holder))

    def answered_lines(self, bid: str) -> set[int]:
        return {r[0] for r in self.db.execute("SELECT line FROM batch_results WHERE batch_id = ?", (bid,))}

    def stored_answers(self, bid: str) -> list[dict]:
        """Answers kept whole in the store by an earlier version (before the output files), in line order."""
        rows = self.db.execute("SELECT * FROM batch_results WHERE batch_id = ? AND body != '' ORDER BY line", (bid,))
        return [dict(r) for r in rows]

    def _with_counts(self, row: dict) -> dict:
        done = self.db.execute("SELECT COUNT(*), SUM(CASE WHEN status_code >= 200 AND status_code < 300 THEN 1 ELSE 0 END) "
                               "FROM batch_results "
                               "WHERE batch_id = ?", (row["id"],)).fetchone()
        completed = int(done[1] or 0)
        row["request_counts"] = {"total": row["total"], "completed": completed, "failed": int(done[0]) - completed}
        for key in ("metadata", "errors"):
            row[key] = json.loads(row[key]) if row[key] else None
        return row
