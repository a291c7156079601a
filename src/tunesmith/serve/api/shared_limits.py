"""A key's requests in flight and tokens a minute counted over every replica sharing one PostgreSQL
(``--database``), so that ``--requests-per-key N`` and ``--tokens-per-minute-per-key T`` mean N and T for the
platform, not per replica.

Each replica keeps one row per key (``key_places``: the key, the replica, its requests in flight, when last seen, in
the database's clock). A request takes a place in one short transaction that waits for the key's advisory lock, adds
the live rows of every replica and counts itself only while the sum is under the limit; its end gives the place
back. Every write of a replica's row sets the replica's true count, which it keeps in memory (taken inside the same
locked transaction, given back at once): a give-back that fails while the database is away is healed by the next
write, and the replica rewrites each of its rows every third of :data:`tunesmith.serve.store.LEASE_S`, so no key's
place stays counted past that; a replica that died stops counting once its lease has run out.

Admission runs in a lane of its own (:data:`ADMISSION`: a few threads, one per key at a time, keys served in turn):
one key's burst waits behind itself, never holds more than that share of the database's pool, and another key's
request finds a thread free.

A key's tokens are kept per whole second (``key_tokens``: the key, the second, the tokens its requests asked for
then, whichever replica served them). Once a request is planned (its prompt counted, after it took its place),
its tokens are charged in one short transaction under the key's advisory lock for tokens (apart from its places'
lock, so that a charge never waits for another request's place): PostgreSQL adds the key's seconds of the sliding
minute and counts the request only while the sum stays within the limit. A second counts until the minute after
its end has passed, so a request's tokens hold the key's minute up to one second longer than on one server, never
shorter. Each replica's renewal deletes seconds long past.

When the database cannot be reached the request is refused with a 503 that says so: a limit never falls back to
counting per replica in silence. On SQLite (one server) none of this runs.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from tunesmith.serve.errors import APIError
from tunesmith.serve.lanes import Lane, LaneSize
from tunesmith.serve.store import LEASE_S
from tunesmith.serve.store.database import NOW

log = logging.getLogger("tunesmith.serve")
NO_KEY = ""  # the owner of a server without keys
TOKENS_KEPT_S = 120.0  # a key's seconds of tokens older than this are deleted (the limit reads the last minute)
ADMISSION = LaneSize(workers=4, per_key=1, queued=4096)  # a quarter of the pool's 16 connections at most


class SharedPlaces:
    """Places of keys' requests in flight (the store's ``key_places``), as ``replica``, and keys' tokens a minute
    (``key_tokens``)."""

    def __init__(self, store, replica: str):
        self.db, self.replica = store.db, replica
        self.stop = threading.Event()
        self.returns = ThreadPoolExecutor(1, thread_name_prefix="key-places")  # places given back, in order
        self.thread: threading.Thread | None = None
        self.lane = Lane("admission", ADMISSION, "requests being admitted")
        self.held: Counter = Counter()  # key -> this replica's requests in flight: the truth its rows are set to
        self.counting = threading.Lock()

    def take(self, owner: str | None, limit: int) -> int | None:
        """One place for ``owner``'s request if its requests in flight over all replicas are under ``limit``:
        returns None when taken, else the count in flight (the request is refused)."""
        key, counted = owner or NO_KEY, False
        try:
            with self.db.transaction():
                self.db.serialize(f"key_places:{key}")
                used = self.db.execute(f"SELECT COALESCE(SUM(in_flight), 0) FROM key_places WHERE owner = ? AND "
                                       f"seen >= {NOW} - ?", (key, LEASE_S)).fetchone()[0]
                if used >= limit:
                    return int(used)
                with self.counting:
                    self.held[key] += 1
                counted = True
                self._write(key)
        except BaseException as exc:
            if counted:  # not committed: the place is not this request's
                self._count_off(key)
            if isinstance(exc, Exception):
                raise unreachable(exc) from exc
            raise
        return None

    def _write(self, key: str) -> None:
        """Inside the key's locked transaction: this replica's row of ``key`` set to its true count now."""
        with self.counting:
            count = self.held[key]
        self.db.execute(f"INSERT INTO key_places VALUES (?, ?, ?, {NOW}) ON CONFLICT (owner, replica) DO UPDATE "
                        "SET in_flight = excluded.in_flight, seen = excluded.seen", (key, self.replica, count))

    def _count_off(self, key: str) -> None:
        with self.counting:
            self.held[key] -= 1
            if self.held[key] <= 0:
                del self.held[key]

    def spend(self, owner: str | None, tokens: int, limit: int, window_s: float) -> tuple[bool, list[tuple[float, int]]]:
        """``tokens`` charged to ``owner`` if its tokens of the last ``window_s`` seconds, over all replicas, stay
        within ``limit`` with them (every second in the database's clock). Returns whether they were, and the key's
        window then: (seconds since each second ended, its tokens), oldest first; the second being charged ends in
        the future (a negative age)."""
        key = owner or NO_KEY
        try:
            with self.db.transaction():
                self.db.serialize(f"key_tokens:{key}")
                now = float(self.db.execute(f"SELECT {NOW}").fetchone()[0])
                oldest = now - window_s - 1  # a second counts while the minute after its end has not passed
                charged = self.db.execute(
                    "INSERT INTO key_tokens (owner, bucket, tokens) SELECT ?, ?, ? WHERE ? + (SELECT COALESCE("
                    "SUM(tokens), 0) FROM key_tokens WHERE owner = ? AND bucket > ?) <= ? ON CONFLICT (owner, bucket) "
                    "DO UPDATE SET tokens = key_tokens.tokens + excluded.tokens",
                    (key, int(now), tokens, tokens, key, oldest, limit)).rowcount == 1
                rows = self.db.execute("SELECT bucket, tokens FROM key_tokens WHERE owner = ? AND bucket > ? "
                                       "ORDER BY bucket", (key, oldest)).fetchall()
        except Exception as exc:  # noqa: BLE001 - the database's error, said as the server's
            raise unreachable(exc, "tokens a minute") from exc
        return charged, [(now - (second + 1), int(n)) for second, n in rows]

    def give_back(self, owner: str | None) -> None:
        """The place given back: at once in this replica's count, then in its row by its own thread (a request's end
        never waits for the database; a failure is healed by the next write of the row)."""
        self._count_off(owner or NO_KEY)
        self.returns.submit(self._give_back, owner or NO_KEY)

    def _give_back(self, key: str) -> None:
        try:
            with self.db.transaction():
                self.db.serialize(f"key_places:{key}")
                self._write(key)
        except Exception as exc:  # noqa: BLE001 - the row is set to the true count at the next renewal
            log.warning("a key's place given back is written at the next renewal (%s)", type(exc).__name__)

    def renew(self) -> None:
        """Each of this replica's rows set to its true count and marked alive (one whose count is 0 deleted); rows of
        replicas long dead and keys' seconds of tokens past :data:`TOKENS_KEPT_S` deleted."""
        rows = {r[0] for r in self.db.execute("SELECT owner FROM key_places WHERE replica = ?", (self.replica,))}
        with self.counting:
            keys = rows | set(self.held)
        for key in keys:
            with self.db.transaction():
                self.db.serialize(f"key_places:{key}")
                with self.counting:
                    alive = self.held[key] > 0
                if alive:
                    self._write(key)
                else:
                    self.db.execute("DELETE FROM key_places WHERE owner = ? AND replica = ?", (key, self.replica))
        self.db.execute(f"DELETE FROM key_places WHERE seen < {NOW} - ?", (10 * LEASE_S,))  # long dead
        self.db.execute(f"DELETE FROM key_tokens WHERE bucket < {NOW} - ?", (TOKENS_KEPT_S,))

    def start(self) -> None:
        """:meth:`renew` every third of a lease, in a thread (stale rows from an earlier run of the same replica id
        cannot exist: each start is a new id)."""
        def beat():
            while not self.stop.wait(LEASE_S / 3):
                try:
                    self.renew()
                except Exception as exc:  # noqa: BLE001 - retried at the next beat; requests meanwhile say it
                    log.warning("could not renew this replica's places of keys' requests (%s)", type(exc).__name__)

        self.thread = threading.Thread(target=beat, name="key-places", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.returns.shutdown(wait=True)
        self.lane.close()
        try:
            self.db.execute("DELETE FROM key_places WHERE replica = ?", (self.replica,))
        except Exception:  # noqa: BLE001 - the rows expire with the lease anyway
            pass


def unreachable(exc: Exception, what: str = "requests in flight") -> APIError:
    return APIError(503, f"The server cannot reach its database to count this key's {what} across replicas, and "
                    f"refuses rather than count them per replica ({type(exc).__name__}). Retry shortly.",
                    type_="server_error", code="limits_unavailable", headers={"retry-after": "2"})
