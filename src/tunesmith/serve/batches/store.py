"""Batches, their chunks and their answered lines in the server's store (migrations 0019-0020, 0031-0032,
0049-0050). A batch belongs to the key that created it. Its requests are split into chunks of a fixed number of
lines when it starts (``batch_chunks``), each claimed by one replica at a time with a lease, as jobs are; each
answered line is recorded (its number and status; the answer itself is in its chunk's part file,
:mod:`tunesmith.serve.batches.output`) with the chunk's part files' lengths, in one transaction, so a chunk whose
replica stopped or died goes on, on any replica, with the lines it has not answered. Who finishes a batch (assembles
its files from the parts and gives it its final status) is decided once, in one transaction per batch.

Every claim here is one of :mod:`tunesmith.serve.store.claims` (a generation in database time, renewed by the
heartbeat): a batch's to split it, a chunk's to answer it, a batch's finishing (``batch_finishes``). Each write its
holder makes is fenced by the claim's generation, and a chunk's answers are appended to part files of the holder's
generation: one frozen past its lease writes into files no other holder reads and records nothing.

A batch run by chunks is held by its chunks from then on (``batches.claim_status`` :data:`CHUNKED`), and a batch whose
end is written is finished by nobody again (``batch_finishes.claim_status`` :data:`ENDED`): neither row is claimed
again."""

from __future__ import annotations

import json
import time

from tunesmith.serve.store import Store, new_id
from tunesmith.serve.store.claims import LET_GO, Claim, ClaimLost, free, held
from tunesmith.serve.store.database import NOW
from tunesmith.serve.store.pages import page_rows

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
CHUNKED = "chunks"  # batches.claim_status of a batch run chunk by chunk
ENDED = "ended"  # batch_finishes.claim_status of a batch whose end is written: its finishing is nobody's again
OPEN = " AND claim_status IS NULL"  # a batch or finishing that may still be claimed (Claims.acquire's ``where``)

# a batch's chunks still to answer, and those a live replica holds
CHUNK_STATES = f"SUM(CASE WHEN status = 'pending' THEN 1 ELSE 0 END), SUM(CASE WHEN {held()} THEN 1 ELSE 0 END)"

__all__ = ["ACTIVE", "CHUNKED", "BatchStore", "ClaimLost"]


class BatchStore:
    def __init__(self, store: Store):
        self.db, self.lock, self.claims = store.db, store.lock, store.claims

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

    def cancel(self, bid: str) -> bool:
        """The batch marked ``cancelling`` if it is still validating or in progress, in one conditional statement
        (never over a status it reached meanwhile: a batch that completed stays completed)."""
        with self.lock:
            return self.db.execute("UPDATE batches SET status = 'cancelling', cancelling_at = ? WHERE id = ? AND "
                                   "status IN ('validating', 'in_progress')", (int(time.time()), bid)).rowcount == 1

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

    def fail(self, bid: str, errors: list[dict], claim: Claim | None = None) -> None:
        """The batch failed with ``errors``; its claims let go (its finishing ended for good). With the ``claim`` of
        the work that failed, only while it holds (:class:`ClaimLost` otherwise)."""
        def failed() -> None:
            self.update(bid, errors=errors, claimed_by=None, lease_until=None)
            self.mark(bid, "failed")
            self._end_finishing(bid)

        if claim is not None:
            claim.write(failed)
            return
        with self.db.transaction():
            failed()

    def final_status(self, bid: str) -> str:
        """What a batch that ends now ends as: cancelled once cancelled, else completed when every line is answered,
        else expired."""
        row = self.get(bid, any_owner=True)
        counts = row["request_counts"]
        if row["status"] == "cancelling" or row["cancelling_at"] is not None:
            return "cancelled"
        return "completed" if counts["completed"] + counts["failed"] >= row["total"] else "expired"

    def finished(self, bid: str, status: str, files: dict[str, str]) -> None:
        """The batch's final ``status`` and its output and error file ids (``files``); every claim on it let go and its
        finishing ended for good (inside its finisher's fenced transaction)."""
        self.update(bid, **files, claimed_by=None, lease_until=None)
        self.mark(bid, status)
        self.db.execute(f"UPDATE batch_chunks SET {LET_GO} WHERE batch_id = ?", (bid,))
        self._end_finishing(bid)

    def _end_finishing(self, bid: str) -> None:
        """The batch's finishing :data:`ENDED` (its claim let go for good): a replica that read the batch still
        finalizing just before its end was written can no longer take the finishing (and write the batch back to
        finalizing, to assemble parts already removed)."""
        self.db.execute(f"UPDATE batch_finishes SET claim_status = ?, {LET_GO} WHERE id = ?", (ENDED, bid))

    # --- chunks: a batch's lines answered by any replica -----------------------------------------------------

    def claim_batch(self, bid: str, holder: str) -> Claim | None:
        """The batch claimed by ``holder`` to split it into chunks (or to finish it when nothing is left to answer);
        None while another holds it, or once it is run by chunks (:data:`CHUNKED`)."""
        return self.claims.acquire("batches", bid, holder, OPEN)

    def add_chunks(self, bid: str, bounds: list[tuple[int, int, int, int]], claim: Claim) -> bool:
        """The batch's chunks (each: first line, lines spanned, first byte, requests) recorded and the batch marked
        run by chunks (and in progress), in one transaction fenced by the batch's ``claim``; False (nothing
        recorded) when it no longer holds. The claim ends with it (the batch is held by its chunks from then on)."""
        rows = [(f"{bid}.{n}", bid, n, *bound, "pending") for n, bound in enumerate(bounds)]

        def split() -> None:
            self.db.executemany("INSERT OR IGNORE INTO batch_chunks (id, batch_id, chunk, first_line, lines, "
                                "first_byte, requests, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self.db.execute(f"UPDATE batches SET claim_status = ?, {LET_GO}, in_progress_at = CASE WHEN status = "
                            "'validating' THEN ? ELSE in_progress_at END, status = CASE WHEN status = 'validating' THEN "
                            "'in_progress' ELSE status END WHERE id = ?", (CHUNKED, int(time.time()), bid))

        self.claims.let_go(claim, release=False)  # no longer renewed: the write below ends it
        try:
            claim.write(split)
        except ClaimLost:
            return False
        return True

    def chunks(self, bid: str) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM batch_chunks WHERE batch_id = ? ORDER BY chunk", (bid,))]

    def claim_chunk(self, bid: str, holder: str) -> tuple[dict, Claim] | None:
        """The batch's first chunk still to answer that no live replica holds, claimed for ``holder`` while the batch
        is in progress (of replicas claiming at once, one gets each chunk): (the chunk as claimed, the claim); None
        when there is none."""
        nobodys = [r[0] for r in self.db.execute("SELECT id FROM batch_chunks WHERE batch_id = ? AND status = "
                                                 f"'pending' AND {free()} ORDER BY chunk", (bid,))]
        for cid in nobodys:
            claim = self.claims.acquire("batch_chunks", cid, holder, " AND status = 'pending' AND EXISTS (SELECT 1 "
                                        "FROM batches WHERE id = ? AND status = 'in_progress')", (bid,))
            if claim is not None:
                return dict(self.db.execute("SELECT * FROM batch_chunks WHERE id = ?", (cid,)).fetchone()), claim
        return None

    def add_chunk_result(self, chunk: dict, line: int, custom_id: str, status_code: int, output_bytes: int,
                         error_bytes: int, claim: Claim) -> None:
        """One line of ``chunk`` answered (its answer already appended to the part files of the ``claim``'s
        generation) and those files' lengths now, in one transaction fenced by the claim; :class:`ClaimLost` (nothing
        recorded) when it no longer holds: the replica that took the chunk over starts from what was recorded."""
        def record() -> None:
            self.db.execute("UPDATE batch_chunks SET output_bytes = ?, error_bytes = ?, parts_generation = ? "
                            "WHERE id = ?", (output_bytes, error_bytes, claim.generation, chunk["id"]))
            self.db.execute("INSERT INTO batch_results VALUES (?, ?, ?, ?, '') ON CONFLICT (batch_id, line) DO UPDATE "
                            "SET custom_id = excluded.custom_id, status_code = excluded.status_code, body = ''",
                            (chunk["batch_id"], line, custom_id, status_code))

        claim.write(record)

    def answered_in(self, chunk: dict) -> set[int]:
        """The lines of ``chunk`` answered (by any replica, or by an earlier version before the chunks)."""
        return {r[0] for r in self.db.execute(
            "SELECT line FROM batch_results WHERE batch_id = ? AND line >= ? AND line < ?",
            (chunk["batch_id"], chunk["first_line"], chunk["first_line"] + chunk["lines"]))}

    def chunk_done(self, chunk: dict, claim: Claim) -> bool:
        """``chunk`` marked answered (and its claim let go) if every one of its requests is recorded and ``claim``
        holds it; False otherwise (the claim let go either way)."""
        def done() -> bool:
            return self.db.execute(
                f"UPDATE batch_chunks SET status = 'done', answered_by = claimed_by, {LET_GO} WHERE id = ? AND requests "
                "<= (SELECT COUNT(*) FROM batch_results WHERE batch_id = ? AND line >= ? AND line < ?)",
                (chunk["id"], chunk["batch_id"], chunk["first_line"], chunk["first_line"] + chunk["lines"])).rowcount == 1

        self.claims.let_go(claim, release=False)
        try:
            if claim.write(done):
                return True
        except ClaimLost:
            return False
        claim.release()
        return False

    def chunk_states(self, bids: list[str]) -> dict[str, tuple[int, int]]:
        """(chunks still to answer, chunks a live replica holds) of each of these batches (none: (0, 0))."""
        if not bids:
            return {}
        marks = ", ".join("?" * len(bids))
        rows = self.db.execute(f"SELECT batch_id, {CHUNK_STATES} FROM batch_chunks WHERE batch_id IN ({marks}) GROUP BY "
                               "batch_id", bids)
        return {bid: (0, 0) for bid in bids} | {r[0]: (int(r[1] or 0), int(r[2] or 0)) for r in rows}

    def begin_finishing(self, bid: str, holder: str) -> tuple[str, list[dict], Claim] | None:
        """Whether ``holder`` finishes the batch run by chunks, decided once over every replica: in one transaction
        that finishers of one batch take one at a time, when no live replica holds a chunk of it and nothing is left
        to answer (every chunk answered, or the batch cancelled, past its window, or already finalizing and its
        finisher dead), every chunk's claim is ended (a new generation: a holder frozen past its lease records
        nothing more), the batch marked finalizing and its finishing claimed for ``holder``. Returns (its final
        status, its chunks in order, the finishing's claim), or None: not now, or another's."""
        try:
            return self._begin_finishing(bid, holder)
        except _EndedMeanwhile as ended:  # rolled back: the acquire and its new generations undone
            self.claims.let_go(ended.claim, release=False)
            return None

    def _begin_finishing(self, bid: str, holder: str) -> tuple[str, list[dict], Claim] | None:
        with self.db.transaction():
            self.db.serialize(f"batch {bid}")
            batch = self.db.execute(f"SELECT status, claim_status, cancelling_at, expires_at < {NOW} AS expired FROM "
                                    "batches WHERE id = ?", (bid,)).fetchone()
            if batch is None or batch["claim_status"] != CHUNKED or batch["status"] not in ACTIVE:
                return None
            pending, holders = self.db.execute(f"SELECT {CHUNK_STATES} FROM batch_chunks WHERE batch_id = ?",
                                               (bid,)).fetchone()
            ended = batch["status"] in ("cancelling", "finalizing") or batch["cancelling_at"] is not None \
                or bool(batch["expired"])
            if holders or (pending and not ended):
                return None
            self.db.execute("INSERT OR IGNORE INTO batch_finishes (id) VALUES (?)", (bid,))
            claim = self.claims.acquire("batch_finishes", bid, holder, OPEN)
            if claim is None:
                return None  # its finisher is alive
            self.db.execute(f"UPDATE batch_chunks SET generation = generation + 1, {LET_GO} WHERE batch_id = ? AND "
                            "claimed_by IS NOT NULL", (bid,))
            if not self.db.execute(f"UPDATE batches SET status = 'finalizing', finalizing_at = COALESCE(finalizing_at, "
                                   f"?) WHERE id = ? AND status IN ({', '.join('?' * len(ACTIVE))})",
                                   (int(time.time()), bid, *ACTIVE)).rowcount:
                raise _EndedMeanwhile(claim)  # its end was written after the look above (belt and braces: ENDED)
            return self.final_status(bid), self.chunks(bid), claim

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


class _EndedMeanwhile(Exception):
    """The batch's end was written between a finisher's look and its claim: nothing it wrote is kept."""

    def __init__(self, claim: Claim):
        super().__init__(claim)
        self.claim = claim
