"""The store's database: SQLite in ``--data-dir`` (the embedded default) or PostgreSQL (``--database
postgresql://…``, shared by replicas), behind one small interface that every store module uses.

The SQL is written once, in the dialect both accept (``?`` placeholders, ``ON CONFLICT`` upserts, row values), and
translated for PostgreSQL by :func:`to_postgres`: ``IS ?`` (equal, NULL included) becomes an equality PostgreSQL can
use an index for, ``INSERT OR IGNORE`` an ``ON CONFLICT DO NOTHING``, and a table's DDL gets 64-bit integers and a
``rowid`` column (SQLite's implicit insertion order, which the lists order by). The one expression with no common spelling (a JSON
field) is a method of the backend. Rows read as SQLite's do: by name and by position.

PostgreSQL is reached through psycopg 3 and its connection pool: the store's SQL is plain, hand-written and small,
so a driver (rather than an ORM or SQLAlchemy's expression language) keeps each query as readable as it is today.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

from tunesmith.errors import TunesmithError

log = logging.getLogger("tunesmith.serve")
DATABASE_ENV = "TUNESMITH_DATABASE"  # the PostgreSQL URL, passed to the jobs worker by environment (not argv: a password)
MIGRATION_LOCK = 0x74756E65  # PostgreSQL advisory lock held while one replica migrates ("tune")
POOL_WAIT_S = 5.0  # a statement waits this long for a pooled connection, then the store is unavailable (a 503)
LOCK_WAIT_MS = 5_000  # PostgreSQL's lock_timeout: no statement waits longer for a row or advisory lock
STATEMENT_MS = 30_000  # statement_timeout: no statement of a request runs longer
IDLE_IN_TRANSACTION_MS = 15_000  # a transaction left open this long (its process frozen) is ended, its locks freed
NOW = "db_now()"  # the database's clock in seconds since the epoch, in the stores' SQL: leases never use a replica's


def database_url() -> str | None:
    """The ``--database`` URL this process was given through :data:`DATABASE_ENV`; None: SQLite."""
    return os.environ.get(DATABASE_ENV) or None


class DatabaseError(TunesmithError):
    """The store's database cannot be reached or used as configured."""


class StoreUnavailable(DatabaseError):
    """A statement failed for a reason that passes (the database restarting or unreachable, a connection cut, a lock
    or statement timeout, SQLite busy): a request answers 503, claimed work retries or waits; never a 500."""


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of the database that passes (retry later), not of the statement."""
    if isinstance(exc, StoreUnavailable):
        return True
    if isinstance(exc, sqlite3.OperationalError):
        return "locked" in str(exc) or "busy" in str(exc)
    try:
        import psycopg
    except ImportError:
        return False
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


def log_failure(log, what: str, exc: BaseException) -> None:
    """``what`` failed: one line when the database is away for a moment (it is looked at again), the traceback
    otherwise."""
    if transient(exc):
        log.warning("%s: the store is unavailable for now (%s)", what, type(exc).__name__)
    else:
        log.error("%s", what, exc_info=exc)


@contextlib.contextmanager
def unavailable_as_ours(what: str = "the store's database") -> Iterator[None]:
    """Transient failures of the driver raised as :class:`StoreUnavailable` (the boundary of a third party)."""
    try:
        yield
    except StoreUnavailable:
        raise
    except Exception as exc:
        if transient(exc):
            raise StoreUnavailable(f"{what} is unavailable ({type(exc).__name__}: {str(exc)[:200]})") from exc
        raise


def open_database(url: str | None, root: Path) -> SQLiteDatabase | PostgresDatabase:
    """SQLite at ``<root>/tunesmith.sqlite`` when ``url`` is None, else the PostgreSQL database at ``url``."""
    if url is None:
        return SQLiteDatabase(Path(root) / "tunesmith.sqlite")
    if not url.startswith(("postgresql://", "postgres://")):
        raise DatabaseError(f"--database {url.split('://')[0]}://…: only postgresql:// URLs are supported (leave "
                            "--database out for the embedded SQLite store)")
    return PostgresDatabase(url)


class Row:
    """One row, read by column name or by position (as ``sqlite3.Row``); ``dict(row)`` gives name → value."""

    __slots__ = ("_index", "_values")

    def __init__(self, index: dict[str, int], values: Sequence):
        self._index, self._values = index, values

    def __getitem__(self, key):
        return self._values[key if isinstance(key, int) else self._index[key]]

    def keys(self) -> list[str]:
        return list(self._index)

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


class Result:
    """A statement's rows, read whole (every query of the stores is bounded), and its row count."""

    def __init__(self, rows: list, rowcount: int):
        self.rows, self.rowcount = rows, rowcount

    def fetchone(self):
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list:
        return list(self.rows)

    def __iter__(self):
        return iter(self.rows)


# --- SQLite -------------------------------------------------------------------------------------------------


def _retry_while_locked(op, seconds: float = 30.0):
    """Run ``op``, retrying while SQLite says the database is locked: switching a new database to WAL
    takes an exclusive lock without waiting on the busy timeout, so processes opening it at once collide."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return op()
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class SQLiteDatabase:
    """One SQLite file in write-ahead-log mode, a connection for each thread that uses it: a thread's statements never
    land in another thread's transaction, and a reader sees the last commit without waiting for a writer (WAL's
    snapshots). Writers take the file's write lock in turn (``busy_timeout``: 30 s); transactions of this process also
    take :attr:`lock` first, as the stores' multi-statement writes do."""

    kind = "sqlite"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.local = threading.local()
        self.lock = threading.RLock()
        self.opened: list[sqlite3.Connection] = []
        _retry_while_locked(lambda: self.db.execute("PRAGMA journal_mode=WAL"))

    @property
    def db(self) -> sqlite3.Connection:
        """This thread's connection (made at its first use)."""
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            conn.row_factory = sqlite3.Row
            conn.create_function("db_now", 0, time.time)  # one server, one machine: its clock is the store's
            self.local.conn = conn
            with self.lock:
                self.opened.append(conn)
        return conn

    row_lock = ""  # inside a transaction SQLite's write lock already holds every row

    def execute(self, sql: str, params: Sequence = ()) -> Result:
        """One statement on this thread's connection, its rows read whole (a ``RETURNING`` statement is finished, its
        write committed, before it returns)."""
        with unavailable_as_ours():
            cur = self.db.execute(sql, params)
            return Result(cur.fetchall(), cur.rowcount)

    def executemany(self, sql: str, rows: Sequence[Sequence]) -> None:
        with unavailable_as_ours():
            self.db.executemany(sql, rows)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Statements that commit together (``BEGIN IMMEDIATE``: the write lock taken first)."""
        with self.lock:
            if self.db.in_transaction:  # nested: part of the outer one
                yield
                return
            with unavailable_as_ours():
                self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            try:
                with unavailable_as_ours():
                    self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def migrating(self) -> Iterator[None]:
        """The migrations' transaction: the write lock taken before reading which are done, so processes opening a
        new database at once wait for each other; what a migration rewrites is zeroed in the file
        (``secure_delete``) and the log checkpointed after, so no old value (a raw key) stays in the bytes."""
        with self.lock:
            wiped = self.db.execute("PRAGMA secure_delete").fetchone()[0]
            self.db.execute("PRAGMA secure_delete = ON")
            try:
                with self.transaction():
                    yield
            finally:
                self.db.execute(f"PRAGMA secure_delete = {int(wiped)}")
            with contextlib.suppress(sqlite3.OperationalError):  # best effort: another process may hold pages
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def serialize(self, name: str) -> None:
        """Inside a transaction: wait for others serializing on ``name`` (SQLite's write lock already does)."""

    def notify(self, channel: str, payload: str) -> None:
        """Nothing: one process uses SQLite, and it knows what it wrote."""

    def listen(self, channels: Sequence[str], heard) -> None:
        """None: nothing to listen to (see :meth:`PostgresDatabase.listen`)."""
        return None

    def tables(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]

    def columns(self, table: str) -> list[str]:
        return [c[1] for c in self.db.execute(f'PRAGMA table_info("{table}")')]

    @staticmethod
    def json_field(column: str, name: str) -> str:
        """SQL for the top-level field ``name`` (one of ours, never a caller's) of ``column``, a JSON object."""
        return f"json_extract({column}, '$.{_identifier(name)}')"

    def close(self) -> None:
        with self.lock:
            for conn in self.opened:
                conn.close()
            self.opened.clear()


# --- PostgreSQL ---------------------------------------------------------------------------------------------


_PARAM = re.compile(r"([\w.]+)\s+IS\s+(NOT\s+)?\?|\?")
_CREATE_TABLE = re.compile(r"^\s*CREATE\s+TABLE\b", re.IGNORECASE)


@lru_cache(maxsize=1024)
def to_postgres(sql: str) -> str:
    """``sql`` in SQLite's spelling as PostgreSQL spells it, its parameters named ``p0``, ``p1``… in order (psycopg's
    ``%(p0)s``). ``col IS ?`` (equal, NULL included) becomes ``(col = %(pN)s OR (col IS NULL AND %(pN)s IS NULL))``:
    PostgreSQL plans each statement with its values (the pool's connections never prepare statements: a prepared
    statement's generic plan, made once for any values, keeps the NULL branch and reads past the index), so for a
    value that is not NULL this is ``col = value`` and uses the column's index, which ``IS NOT DISTINCT FROM`` never
    does."""
    out = sql.replace("%", "%%").replace(NOW, "EXTRACT(EPOCH FROM clock_timestamp())::float8")
    if re.match(r"^\s*INSERT\s+OR\s+IGNORE\b", out, re.IGNORECASE):
        out = re.sub(r"^\s*INSERT\s+OR\s+IGNORE\b", "INSERT", out, flags=re.IGNORECASE) + " ON CONFLICT DO NOTHING"
    if _CREATE_TABLE.match(out) or re.match(r"^\s*ALTER\s+TABLE\b", out, re.IGNORECASE):
        out = out.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
        out = re.sub(r"\bINTEGER\b", "BIGINT", out)
        out = re.sub(r"\bREAL\b", "DOUBLE PRECISION", out)
    if _CREATE_TABLE.match(out):  # SQLite's implicit insertion order, made a column
        out = out[:out.rindex(")")] + ", rowid BIGSERIAL)"
    numbers = itertools.count()

    def named(m: re.Match) -> str:
        p = f"%(p{next(numbers)})s"
        column, negated = m.group(1), m.group(2)
        if column is None:
            return p
        if negated:
            return f"{column} IS DISTINCT FROM {p}"
        return f"({column} = {p} OR ({column} IS NULL AND {p} IS NULL))"

    return _PARAM.sub(named, out)


def _named(params: Sequence) -> dict:
    return {f"p{i}": v for i, v in enumerate(params)}


def _plain(value):
    """PostgreSQL's SUM of integers is a numeric: back to the int SQLite gives."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def _selects_rowid(sql: str) -> bool:
    head = re.split(r"\bFROM\b", sql, maxsplit=1, flags=re.IGNORECASE)[0]
    return "rowid" in head


class NoLock:
    """The stores' write lock on PostgreSQL: none. Its transactions take row and advisory locks in the database; a
    process-wide lock taken between their statements would wait on a thread that waits on their rows."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


class PostgresDatabase:
    """A PostgreSQL database through a pool of connections (each statement its own transaction unless inside
    :meth:`transaction`, which keeps one connection for the thread that opened it). Every connection is checked when
    it leaves the pool (a restart's dead connections are replaced, never handed out), waits at most
    :data:`LOCK_WAIT_MS` for a lock and :data:`STATEMENT_MS` for a statement; a transaction idle for
    :data:`IDLE_IN_TRANSACTION_MS` (its process frozen) is ended by the server. A failure that passes is raised as
    :class:`StoreUnavailable`."""

    kind = "postgresql"
    row_lock = " FOR UPDATE"  # a row read inside a transaction is held until it ends

    def __init__(self, url: str, max_connections: int = 16):
        try:
            from psycopg_pool import ConnectionPool
        except ImportError as exc:
            raise DatabaseError("--database postgresql://… needs psycopg: pip install 'tunesmith[postgresql]'") from exc
        self.url, self.local = url, threading.local()
        self.lock = NoLock()
        options = (f"-c lock_timeout={LOCK_WAIT_MS} -c statement_timeout={STATEMENT_MS} "
                   f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}")
        self.pool = ConnectionPool(url, min_size=1, max_size=max_connections, open=False, timeout=POOL_WAIT_S,
                                   check=ConnectionPool.check_connection, reconnect_timeout=24 * 3600,
                                   kwargs={"autocommit": True, "prepare_threshold": None, "options": options})
        try:
            self.pool.open(wait=True, timeout=15)
        except Exception as exc:  # noqa: BLE001 - psycopg_pool's timeout or a connection error
            self.pool.close()
            raise DatabaseError(f"--database: cannot reach PostgreSQL at {_safe(url)}: {exc}") from exc

    @contextlib.contextmanager
    def _connection(self):
        held = getattr(self.local, "conn", None)
        if held is not None:  # inside this thread's transaction
            yield held
            return
        with unavailable_as_ours(), self.pool.connection() as conn:
            yield conn

    def execute(self, sql: str, params: Sequence = ()) -> Result:
        with self._connection() as conn, unavailable_as_ours(), conn.cursor() as cur:
            cur.execute(to_postgres(sql), _named(params))
            if cur.description is None:
                return Result([], cur.rowcount)
            names = [d.name for d in cur.description]
            keep = [i for i, n in enumerate(names) if n != "rowid" or _selects_rowid(sql)]
            index = {names[i]: j for j, i in enumerate(keep)}
            rows = [Row(index, [_plain(r[i]) for i in keep]) for r in cur.fetchall()]
            return Result(rows, cur.rowcount)

    def executemany(self, sql: str, rows: Sequence[Sequence]) -> None:
        if rows:
            with self._connection() as conn, unavailable_as_ours(), conn.cursor() as cur:
                cur.executemany(to_postgres(sql), [_named(r) for r in rows])

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Statements of this thread that commit together (nested: part of the outer one)."""
        if getattr(self.local, "conn", None) is not None:
            yield
            return
        with unavailable_as_ours(), self.pool.connection() as conn, conn.transaction():
            self.local.conn = conn
            try:
                yield
            finally:
                self.local.conn = None

    @contextlib.contextmanager
    def migrating(self) -> Iterator[None]:
        """The migrations' transaction, under an advisory lock: replicas starting at once migrate one at a time."""
        with self.transaction():
            self.execute("SET LOCAL lock_timeout = 0")  # a long migration of another replica is waited for
            self.execute("SET LOCAL statement_timeout = 0")
            self.execute(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
            yield

    def serialize(self, name: str) -> None:
        """Inside a transaction: wait for other transactions serializing on ``name`` (an advisory lock)."""
        self.execute("SELECT pg_advisory_xact_lock(?)", (_lock_id(name),))

    def notify(self, channel: str, payload: str) -> None:
        """A notification to every connection listening on ``channel`` (every replica's :class:`Listener`); inside a
        transaction, sent when it commits (a listener then reads what it wrote)."""
        self.execute("SELECT pg_notify(?, ?)", (_identifier(channel), payload))

    def listen(self, channels: Sequence[str], heard) -> Listener:
        """``heard(channel, payload)`` called from a thread of its own for each notification on ``channels``, on a
        connection of its own (not the pool's); ``heard(None, None)`` each time it starts listening, when
        notifications may have been missed. The listener's ``alive`` says whether it listens now."""
        return Listener(self.url, [_identifier(c) for c in channels], heard)

    def tables(self) -> list[str]:
        return [r[0] for r in self.execute("SELECT table_name FROM information_schema.tables "
                                           "WHERE table_schema = current_schema()")]

    def columns(self, table: str) -> list[str]:
        return [r[0] for r in self.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = "
                                           "current_schema() AND table_name = ? ORDER BY ordinal_position", (table,))]

    @staticmethod
    def json_field(column: str, name: str) -> str:
        return f"(({column})::jsonb ->> '{_identifier(name)}')"

    def close(self) -> None:
        self.pool.close()


class Listener:
    """PostgreSQL's notifications on some channels, heard on a connection and a thread of their own: what wakes a
    replica the moment another one writes what it waits for, instead of reading the store every few milliseconds.
    A cut connection is made again after :data:`LISTEN_RETRY_S` (``alive`` clear meanwhile: its users read the store
    as often as they would without it)."""

    def __init__(self, url: str, channels: list[str], heard):
        self.url, self.channels, self.heard = url, channels, heard
        self.alive, self.stopped = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, name="store-listener", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import psycopg

        while not self.stopped.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                    for channel in self.channels:
                        conn.execute(f"LISTEN {channel}")
                    self.alive.set()
                    self.heard(None, None)
                    while not self.stopped.is_set():
                        for note in conn.notifies(timeout=LISTEN_WAKE_S):
                            self.heard(note.channel, note.payload)
            except Exception as exc:  # noqa: BLE001 - the database restarting or cut off: listened to again
                if self.alive.is_set():
                    log.warning("the store's notifications stopped (%s: %s); listening again in %.0f s",
                                type(exc).__name__, exc, LISTEN_RETRY_S)
            self.alive.clear()
            self.stopped.wait(LISTEN_RETRY_S)

    def close(self) -> None:
        self.stopped.set()


LISTEN_WAKE_S = 1.0  # how often the listener's thread looks whether it was closed
LISTEN_RETRY_S = 1.0  # a cut listener connection is made again after this long


def _lock_id(name: str) -> int:
    """A stable 63-bit advisory lock id for ``name``."""
    import hashlib

    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1


def _identifier(name: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise ValueError(f"not a field name: {name!r}")
    return name


def _safe(url: str) -> str:
    """``url`` without its password."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)
