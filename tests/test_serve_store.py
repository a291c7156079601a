"""The job store's schema: migrations are applied once, even when many processes open a new database at once."""

import multiprocessing
import sqlite3
import time

from tunesmith.serve.store import Store
from tunesmith.serve.store.migrations import MIGRATIONS


def _open_at(root: str, start_at: float) -> list[str]:
    time.sleep(max(0.0, start_at - time.time()))
    return Store(root).migrate()


def test_processes_opening_a_new_store_at_once_apply_each_migration_once(tmp_path):
    """A server and its Ray workers open the same new database together; none may fail on a locked database
    or a half-applied schema. Five rounds, each on a new database, 8 processes released at the same instant."""
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        for round_ in range(5):
            root = tmp_path / f"round{round_}"
            start_at = time.time() + (3.0 if round_ == 0 else 0.5)  # the first round waits for the processes to start
            results = pool.starmap(_open_at, [(str(root), start_at)] * 8)
            assert all(r == [] for r in results)  # the constructor migrated; a second call finds nothing to do
            db = sqlite3.connect(root / "tunesmith.sqlite")
            assert sorted(r[0] for r in db.execute("SELECT name FROM schema_migrations")) == sorted(n for n, _ in MIGRATIONS)
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_new_database_gets_every_migration_and_a_reopened_one_none(tmp_path):
    store = Store(tmp_path)
    tables = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"files", "jobs", "events", "checkpoints", "schema_migrations"} <= tables
    assert Store(tmp_path).migrate() == []
