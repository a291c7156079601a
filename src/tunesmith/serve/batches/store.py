"""Batches and their answered lines in the server's SQLite store (migrations 0019-0020, 0031-0032). A batch belongs
to the key that created it; each answered line is recorded (its number and status; the answer itself is in the
batch's output or error file, :mod:`tunesmith.serve.batches.output`) with the files' lengths, so a batch interrupted
by a restart goes on with the lines it has not answered."""

from __future__ import annotations

import json
import time

from tunesmith.serve.store import Store, new_id

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")


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

    def list(self, owner: str | None) -> list[dict]:
        rows = self.db.execute("SELECT * FROM batches WHERE owner IS ? ORDER BY created_at DESC, rowid DESC", (owner,))
        return [self._with_counts(dict(r)) for r in rows]

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
