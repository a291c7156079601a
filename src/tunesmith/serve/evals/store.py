"""The evals, their runs and the runs' output items, in the server's SQLite store (tables made by the
store's migrations 0006-0008). Every eval belongs to the API key that created it; its runs and output
items are reached through it, so another key sees none of them."""

from __future__ import annotations

import json
import time

from tunesmith.serve.store import Store, new_id
from tunesmith.serve.store.claims import Claim
from tunesmith.serve.store.pages import page_rows

JSON_COLUMNS = ("data_source_config", "testing_criteria", "metadata", "data_source", "error", "result_counts",
                "per_testing_criteria_results", "per_model_usage", "datasource_item", "results", "sample")


def _row(row) -> dict | None:
    if row is None:
        return None
    d = dict(row)
    for key in JSON_COLUMNS:
        if key in d and d[key] is not None:
            d[key] = json.loads(d[key])
    return d


def _with_status(where: str, args: list, status: str | None) -> tuple[str, list]:
    return (f"{where} AND status = ?", [*args, status]) if status else (where, args)


def _dumped(fields: dict) -> dict:
    return {k: json.dumps(v) if k in JSON_COLUMNS and v is not None else v for k, v in fields.items()}


class EvalStore:
    def __init__(self, store: Store):
        self.db, self.lock, self.base = store.db, store.lock, store

    def _insert(self, table: str, row: dict) -> None:
        row = _dumped(row)
        with self.lock:
            self.db.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                            list(row.values()))

    def _update(self, table: str, id_: str, fields: dict) -> None:
        fields = _dumped(fields)
        with self.lock:
            self.db.execute(f"UPDATE {table} SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?",
                            [*fields.values(), id_])

    # --- evals ------------------------------------------------------------------------------------

    def add_eval(self, owner: str | None, **fields) -> dict:
        eid = new_id("eval")
        self._insert("evals", {"id": eid, "owner": owner, "created_at": int(time.time()), **fields})
        return self.get_eval(eid, owner)

    def get_eval(self, eid: str, owner: str | None) -> dict | None:
        return _row(self.db.execute("SELECT * FROM evals WHERE id = ? AND owner IS ?", (eid, owner)).fetchone())

    def list_evals(self, owner: str | None, order: str = "desc", order_by: str = "created_at", after: str | None = None,
                   limit: int = 20) -> tuple[list[dict], bool]:
        """One page of a key's evals by creation time, or by the time of their last update (their creation when
        never updated), and whether more follow."""
        when = "COALESCE(updated_at, created_at)" if order_by == "updated_at" else "created_at"
        rows, more = page_rows(self.db, "evals", "owner IS ?", [owner], (when, "rowid"), after, limit, order != "asc")
        return [_row(r) for r in rows], more

    def update_eval(self, eid: str, **fields) -> None:
        self._update("evals", eid, {**fields, "updated_at": time.time()})

    def delete_eval(self, eid: str) -> None:
        self._delete(eid, ("eval_output_items", "eval_id"), ("eval_runs", "eval_id"), ("evals", "id"))

    # --- runs -------------------------------------------------------------------------------------

    def add_run(self, owner: str | None, eval_id: str, holder: str, rid: str | None = None,
                **fields) -> tuple[dict, Claim]:
        """A new run (id ``rid``, or a new one), created claimed by ``holder`` in one statement: no replica sees it
        unclaimed (and takes it over as abandoned) before its creator runs it. Returns (the run, its claim)."""
        rid = rid or new_id("evalrun")
        row = _dumped({"id": rid, "eval_id": eval_id, "owner": owner, "status": "queued",
                       "created_at": int(time.time()), **fields})
        with self.lock:
            claim = self.base.claims.insert("eval_runs", row, holder)
        return self.get_run(eval_id, rid), claim

    def get_run(self, eval_id: str, rid: str) -> dict | None:
        return _row(self.db.execute("SELECT * FROM eval_runs WHERE id = ? AND eval_id = ?", (rid, eval_id)).fetchone())

    def list_runs(self, eval_id: str, order: str = "desc", status: str | None = None, after: str | None = None,
                  limit: int = 20) -> tuple[list[dict], bool]:
        """One page of an eval's runs (of ``status``) by creation, and whether more follow."""
        where, args = _with_status("eval_id = ?", [eval_id], status)
        rows, more = page_rows(self.db, "eval_runs", where, args, ("created_at", "rowid"), after, limit, order != "asc")
        return [_row(r) for r in rows], more

    def update_run(self, rid: str, **fields) -> None:
        self._update("eval_runs", rid, fields)

    def move_run(self, rid: str, statuses: tuple[str, ...], **fields) -> bool:
        """Update the run only while its status is one of ``statuses`` (one statement: a cancel landing at the same
        moment either comes first and stays, or comes after); True when it was updated."""
        fields = _dumped(fields)
        marks = ", ".join("?" * len(statuses))
        with self.lock:
            return self.db.execute(f"UPDATE eval_runs SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ? AND "
                                   f"status IN ({marks})", [*fields.values(), rid, *statuses]).rowcount == 1

    def delete_run(self, rid: str) -> None:
        self._delete(rid, ("eval_output_items", "run_id"), ("eval_runs", "id"))

    def delete_output_items(self, rid: str) -> None:
        """The run's output items gone (a run taken over is graded again from its first row)."""
        self._delete(rid, ("eval_output_items", "run_id"))

    def _delete(self, key: str, *rows: tuple[str, str]) -> None:
        """Delete the rows of each (table, column) whose column is ``key``, in order, under the store's lock."""
        with self.lock:
            for table, column in rows:
                self.db.execute(f"DELETE FROM {table} WHERE {column} = ?", (key,))

    # --- output items -----------------------------------------------------------------------------

    def add_output_items(self, run_id: str, eval_id: str, items: list[dict]) -> None:
        """The run's output items, a thousand to a transaction: committed one by one, a run of 10,000 rows spent
        most of its time committing (each commit a sync of SQLite's log)."""
        now = int(time.time())
        for start in range(0, len(items), 1_000):
            with self.db.transaction():
                for item in items[start:start + 1_000]:
                    self._insert("eval_output_items", {"id": new_id("outputitem"), "run_id": run_id, "eval_id": eval_id,
                                                       "created_at": now, **item})

    def output_items(self, run_id: str, order: str = "asc", status: str | None = None, after: str | None = None,
                     limit: int = 100) -> tuple[list[dict], bool]:
        """One page of a run's output items (of ``status``) in row order, and whether more follow."""
        where, args = _with_status("run_id = ?", [run_id], status)
        rows, more = page_rows(self.db, "eval_output_items", where, args, ("item_index",), after, limit, order == "desc")
        return [_row(r) for r in rows], more

    def output_item(self, run_id: str, item_id: str) -> dict | None:
        return _row(self.db.execute("SELECT * FROM eval_output_items WHERE id = ? AND run_id = ?",
                                    (item_id, run_id)).fetchone())
