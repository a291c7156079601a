"""The job store's schema: migrations are applied once, even when many processes open a new database at once."""

import multiprocessing
import sqlite3
import time

from tunesmith.serve.store import MIGRATIONS, Store


def _open_at(root: str, start_at: float) -> list[str]:
    time.sleep(max(0.0, start_at - time.time()))
    return Store(root).migrate()


def test_processes_opening_a_new_store_at_once_apply_each_migration_once(tmp_path):
    """A server and its Ray workers open the same new database together; none may fail on a half-applied schema."""
    start_at = time.time() + 3.0
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        results = pool.starmap(_open_at, [(str(tmp_path), start_at)] * 8)
    assert all(r == [] for r in results)  # the constructor migrated; a second call finds nothing to do
    names = [r[0] for r in sqlite3.connect(tmp_path / "tunesmith.sqlite").execute("SELECT name FROM schema_migrations")]
    assert sorted(names) == sorted(name for name, _ in MIGRATIONS)


def test_a_new_database_gets_every_migration_and_a_reopened_one_none(tmp_path):
    store = Store(tmp_path)
    tables = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"files", "jobs", "events", "checkpoints", "schema_migrations"} <= tables
    assert Store(tmp_path).migrate() == []
