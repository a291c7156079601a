"""A key's requests in flight and tokens a minute counted over every replica sharing one PostgreSQL
(``--database``), so that ``--requests-per-key N`` and ``--tokens-per-minute-per-key T`` mean N and T for the
platform, not per replica.

Each replica keeps one row per key (``key_places``: the key, the replica, its requests in flight, when last seen).
A request takes a place in one short transaction that waits for the key's advisory lock, adds the live rows of every
replica and counts itself only while the sum is under the limit; its end gives the place back. A replica renews its
rows' ``seen`` every third of :data:`tunesmith.serve.store.LEASE_S`, so a replica that died stops counting once its
lease has run out.

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
import time
from concurrent.futures import ThreadPoolExecutor

from tunesmith.serve.errors import APIError
from tunesmith.serve.store import LEASE_S

log = logging.getLogger("tunesmith.serve")
NO_KEY = ""  # the owner of a server without keys
TOKENS_KEPT_S = 120.0  # a key's seconds of tokens older than this are deleted (the limit reads the last minute)


class SharedPlaces:
    """Places of keys' requests in flight (the store's ``key_places``), as ``replica``, and keys' tokens a minute
    (``key_tokens``)."""

    def __init__(self, store, replica: str):
        self.db, self.replica = store.db, replica
        self.stop = threading.Event()
        self.returns = ThreadPoolExecutor(1, thread_name_prefix="key-places")  # places given back, in order
        self.thread: threading.Thread | None = None

    def take(self, owner: str | None, limit: int) -> int | None:
        """One place for ``owner``'s request if its requests in flight over all replicas are under ``limit``:
        returns None when taken, else the count in flight (the request is refused)."""
        now = time.time()
        try:
            with self.db.transaction():
                self.db.serialize(f"key_places:{owner or NO_KEY}")
                used = self.db.execute("SELECT COALESCE(SUM(in_flight), 0) FROM key_places WHERE owner = ? AND "
                                       "seen >= ?", (owner or NO_KEY, now - LEASE_S)).fetchone()[0]
                if used >= limit:
                    return int(used)
                self.db.execute("INSERT INTO key_places VALUES (?, ?, 1, ?) ON CONFLICT (owner, replica) DO UPDATE "
                                "SET in_flight = key_places.in_flight + 1, seen = excluded.seen",
                                (owner or NO_KEY, self.replica, now))
            return None
        except Exception as exc:  # noqa: BLE001 - the database's error, said as the server's
            raise unreachable(exc) from exc

    def spend(self, owner: str | None, tokens: int, limit: int, window_s: float) -> tuple[bool, list[tuple[float, int]]]:
        """``tokens`` charged to ``owner`` if its tokens of the last ``window_s`` seconds, over all replicas, stay
        within ``limit`` with them. Returns whether they were, and the key's window then: (seconds since each
        second ended, its tokens), oldest first; the second being charged ends in the future (a negative age)."""
        now, key = time.time(), owner or NO_KEY
        oldest = now - window_s - 1  # a second counts while the minute after its end has not passed
        try:
            with self.db.transaction():
                self.db.serialize(f"key_tokens:{key}")
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
        """The place given back in this replica's own thread: a request's end never waits for the database."""
        self.returns.submit(self._give_back, owner)

    def _give_back(self, owner: str | None) -> None:
        try:
            self.db.execute("UPDATE key_places SET in_flight = CASE WHEN in_flight > 0 THEN in_flight - 1 ELSE 0 END, "
                            "seen = ? WHERE owner = ? AND replica = ?", (time.time(), owner or NO_KEY, self.replica))
        except Exception:  # noqa: BLE001 - the place stays counted until this replica's rows are renewed or go
            log.exception("could not give back a place of a key's requests in flight")

    def renew(self) -> None:
        """This replica's rows marked alive; rows of replicas long dead and keys' seconds of tokens past
        :data:`TOKENS_KEPT_S` deleted."""
        now = time.time()
        self.db.execute("UPDATE key_places SET seen = ? WHERE replica = ?", (now, self.replica))
        self.db.execute("DELETE FROM key_places WHERE seen < ?", (now - 10 * LEASE_S,))  # long dead
        self.db.execute("DELETE FROM key_tokens WHERE bucket < ?", (now - TOKENS_KEPT_S,))

    def start(self) -> None:
        """:meth:`renew` every third of a lease, in a thread (stale rows from an earlier run of the same replica id
        cannot exist: each start is a new id)."""
        def beat():
            while not self.stop.wait(LEASE_S / 3):
                try:
                    self.renew()
                except Exception:  # noqa: BLE001 - retried at the next beat; requests meanwhile say it
                    log.exception("could not renew this replica's places of keys' requests")

        self.thread = threading.Thread(target=beat, name="key-places", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.returns.shutdown(wait=True)
        try:
            self.db.execute("DELETE FROM key_places WHERE replica = ?", (self.replica,))
        except Exception:  # noqa: BLE001 - the rows expire with the lease anyway
            pass


def unreachable(exc: Exception, what: str = "requests in flight") -> APIError:
    return APIError(503, f"The server cannot reach its database to count this key's {what} across replicas, and "
                    f"refuses rather than count them per replica ({type(exc).__name__}). Retry shortly.",
                    type_="server_error", code="limits_unavailable", headers={"retry-after": "2"})
