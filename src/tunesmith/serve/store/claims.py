"""Claims: work any live replica may take (a fine-tuning job, a batch's chunk, a batch's finishing, an eval run, a
Tinker training run), held by one at a time, fenced so that a holder that lost its claim writes nothing; and each
replica's Tinker presence (``tinker_replicas``: while it lasts, the futures that replica took may still be answered).

One type for every kind of claimed work. A claimable row has ``claimed_by``, ``lease_until`` and ``generation``:

- **acquire** is one conditional UPDATE: the row is taken when nobody holds it or its lease has run out, its
  ``generation`` goes up by one and its lease ends :data:`LEASE_S` later, both in the database's clock (``db_now()``
  in SQL): a replica whose clock is a minute off claims and renews exactly as the others do;
- **renew** extends the lease while the row still carries the holder's generation; the process's heartbeat renews
  every held claim every :data:`BEAT_S` and retries a failing database every second, so a restart of PostgreSQL or a
  cut connection costs nothing while the lease lasts. A renewal that finds another generation, or a lease that ran
  out while the database could not be reached (by the holder's own monotonic clock, measured from the start of its
  last renewal that succeeded), loses the claim: :attr:`Claim.lost` is set, its callbacks stop the work;
- **write** runs the holder's store writes in one transaction that first reads the row's generation under a row lock
  (PostgreSQL's ``FOR UPDATE``; SQLite's write lock): another generation raises :class:`ClaimLost` and nothing is
  written. A claim taken meanwhile waits for that transaction, so a write is either before the takeover or refused.
  Files are kept apart by generation (a job's attempt folder, a chunk's part files) and made the work's only by a
  write that checks it. A transient database error is retried while the lease lasts; writes are idempotent (dedup
  keys, upserts), so a retried commit whose answer was lost writes nothing twice.

Work may thus be delivered twice (a holder frozen past its lease resumes while another runs it); that is harmless,
because only one generation's writes are kept.

A row is claimed only here (:meth:`Claims.acquire` takes one; :meth:`Claims.insert` creates one already claimed), and
the stores' own queries ask whether a row is claimed with :func:`free` (nobody holds it) or :func:`held` (a live
holder has it), and let a row go with :data:`LET_GO`. What a row's work has become (a batch run by its chunks, a
batch's finishing over) is a status of its own (``claim_status``), never a holder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

from tunesmith.serve.store.database import NOW, transient

log = logging.getLogger("tunesmith.serve")

LEASE_S = float(os.environ.get("TUNESMITH_LEASE_S") or 30.0)  # a claim not renewed this long is anyone's again
BEAT_S = LEASE_S / 6  # the heartbeat's period: a 20 s outage of the database is survived with time to spare
RETRY_S = (0.25, 0.5, 1.0)  # waits between tries of a failing renewal or write (then every second)
LET_GO = "claimed_by = NULL, lease_until = NULL"  # the SET clause of a row let go: nobody holds it
CLAIMABLE = ("jobs", "batches", "batch_chunks", "batch_finishes", "eval_runs", "tinker_runs", "tinker_replicas")


class ClaimLost(Exception):
    """The claim is no longer its holder's (another generation holds the row, or its lease ran out unrenewed):
    nothing was written."""


def claimable(table: str) -> str:
    if table not in CLAIMABLE:
        raise ValueError(f"{table} rows are not claimed")
    return table


def free(alias: str = "") -> str:
    """SQL true for a row nobody holds: no holder, or its lease ran out by the database's clock (``alias``: the
    claimable table's name or alias in the query, when it joins others)."""
    at = f"{alias}." if alias else ""
    return f"({at}claimed_by IS NULL OR {at}lease_until IS NULL OR {at}lease_until < {NOW})"


def held(alias: str = "") -> str:
    """SQL true for a row a live holder has: its lease has not run out by the database's clock."""
    at = f"{alias}." if alias else ""
    return f"({at}claimed_by IS NOT NULL AND {at}lease_until >= {NOW})"


class Claim:
    """One held claim: ``table``'s row ``oid`` held by ``holder`` in ``generation``."""

    def __init__(self, db, table: str, oid: str, holder: str, generation: int, since: float, observed: bool = False):
        """``since``: when (``time.monotonic()``) the statement that took or renewed it started. ``observed``: held
        by another process that renews it (a job's dispatcher, for the Ray task that runs it): each write that finds
        the row still this generation's counts as a renewal seen."""
        self.db, self.table, self.oid, self.holder, self.generation = db, claimable(table), oid, holder, generation
        self.observed = observed
        self.deadline = since + LEASE_S  # by time.monotonic(): the lease surely holds until then
        self.lost = threading.Event()
        self.reason: str | None = None
        self._on_lost: list[Callable[[str], None]] = []
        self._guard = threading.Lock()

    def __repr__(self) -> str:
        return f"<claim {self.table} {self.oid} g{self.generation} by {self.holder}>"

    @property
    def left_s(self) -> float:
        """Seconds the lease surely lasts, by this process's clock."""
        return self.deadline - time.monotonic()

    def on_lost(self, callback: Callable[[str], None]) -> None:
        """``callback(reason)`` once the claim is lost (at once when it already is), from whichever thread finds it."""
        with self._guard:
            if not self.lost.is_set():
                self._on_lost.append(callback)
                return
        callback(self.reason or "lost")

    def lose(self, reason: str) -> None:
        """The claim is gone: said once in the log, its callbacks run (they stop the work)."""
        with self._guard:
            if self.lost.is_set():
                return
            self.reason = reason
            self.lost.set()
            callbacks, self._on_lost = self._on_lost, []
        log.warning("%s %s: claim lost (generation %d): %s", self.table, self.oid, self.generation, reason)
        for callback in callbacks:
            try:
                callback(reason)
            except Exception:  # noqa: BLE001 - one stop failing must not keep the others from running
                log.exception("stopping the work of a lost claim failed")

    def renew(self) -> bool:
        """The lease extended while the row carries this generation; False (and lost) when it does not. A failure of
        the database is raised (the heartbeat retries)."""
        if self.lost.is_set():
            return False
        start = time.monotonic()
        kept = self.db.execute(f"UPDATE {self.table} SET lease_until = {NOW} + ? WHERE id = ? AND generation = ? "
                               "AND claimed_by = ?", (LEASE_S, self.oid, self.generation, self.holder)).rowcount == 1
        if kept:
            self.deadline = start + LEASE_S
        else:
            self.lose("another holder took it over (its lease had run out)")
        return kept

    def check(self) -> None:
        """Inside a transaction: the row read under a lock; :class:`ClaimLost` unless it still carries this
        generation."""
        if self.lost.is_set():
            raise ClaimLost(f"{self!r}: {self.reason}")
        row = self.db.execute(f"SELECT generation, claimed_by FROM {self.table} WHERE id = ?{self.db.row_lock}",
                              (self.oid,)).fetchone()
        if row is None or row[0] != self.generation or row[1] != self.holder:
            self.lose("another holder took it over (its lease had run out)")
            raise ClaimLost(f"{self!r}: {self.reason}")
        if self.observed:
            self.deadline = max(self.deadline, time.monotonic() + LEASE_S / 2)

    @contextlib.contextmanager
    def fenced(self) -> Iterator[None]:
        """A transaction whose writes are kept only while this claim holds (one try; :meth:`write` retries)."""
        with self.db.transaction():
            self.check()
            yield

    def write(self, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)`` (store writes) in a fenced transaction, tried again while the database fails and the
        lease lasts; :class:`ClaimLost` when the claim is gone or its lease ran out first."""
        def fenced():
            with self.fenced():
                return fn(*args, **kwargs)

        return self._retried(fenced)

    def read(self, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)`` (store reads the work needs) tried again while the database fails and the lease
        lasts; :class:`ClaimLost` when it ran out first."""
        return self._retried(lambda: fn(*args, **kwargs))

    def _retried(self, call: Callable):
        """``call()`` until it returns, tried again after a transient failure of the database while the lease lasts;
        :class:`ClaimLost` once the claim is lost or its lease has run out."""
        for attempt in range(10**9):
            if self.lost.is_set():
                raise ClaimLost(f"{self!r}: {self.reason}")
            try:
                return call()
            except ClaimLost:
                raise
            except Exception as exc:
                if not transient(exc):
                    raise
                if self.left_s <= 0:
                    self.lose(f"its lease ran out while the database could not be reached ({type(exc).__name__})")
                    raise ClaimLost(f"{self!r}: {self.reason}") from exc
                time.sleep(min(RETRY_S[min(attempt, len(RETRY_S) - 1)], max(0.0, self.left_s)))
        raise AssertionError("unreachable")

    def release(self) -> None:
        """Let go (nothing to do when another generation holds it already); a failing database is left to the lease."""
        try:
            self.db.execute(f"UPDATE {self.table} SET {LET_GO} WHERE id = ? AND generation = ? AND claimed_by = ?",
                            (self.oid, self.generation, self.holder))
        except Exception as exc:  # noqa: BLE001 - the lease runs out by itself
            if not transient(exc):
                raise
            log.info("%r: not let go (%s); its lease runs out instead", self, type(exc).__name__)


class Claims:
    """The claims of one process over one store: acquiring, and the heartbeat that renews every claim held."""

    def __init__(self, db):
        self.db = db
        self.held: set[Claim] = set()
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, table: str, oid: str, holder: str, where: str = "", args: tuple = (),
                force: bool = False) -> Claim | None:
        """``holder`` takes row ``oid`` of ``table`` when nobody holds it or its lease has run out (``force``: in any
        case, for the only worker there can be) and ``where`` (more SQL conditions on the row, with ``args``) holds;
        a new generation, held and renewed by the heartbeat. None when the row is another's."""
        taken = self.take(table, oid, holder, where, args, force)
        return None if taken is None else self.adopt(table, oid, holder, *taken)

    def take(self, table: str, oid: str, holder: str, where: str = "", args: tuple = (),
             force: bool = False) -> tuple[int, float] | None:
        """:meth:`acquire`'s statement alone, for a caller that takes the row inside a transaction of its own and holds
        the claim (:meth:`adopt`) once that committed: (the new generation, when the statement started); None when the
        row is another's."""
        since = time.monotonic()
        nobodys = "" if force else f" AND {free()}"
        row = self.db.execute(f"UPDATE {claimable(table)} SET claimed_by = ?, generation = generation + 1, "
                              f"lease_until = {NOW} + ? WHERE id = ?{nobodys}{where} RETURNING generation",
                              (holder, LEASE_S, oid, *args)).fetchone()
        return None if row is None else (row[0], since)

    def insert(self, table: str, row: dict, holder: str) -> Claim:
        """``row`` (column: value, its ``id`` among them) inserted into ``table`` already claimed by ``holder``
        (generation 1, the lease in the database's clock), in one statement: no replica sees it unclaimed (and takes
        it over as abandoned) before its creator runs it. The claim, held from now."""
        since = time.monotonic()
        row = {**row, "claimed_by": holder, "generation": 1}
        self.db.execute(f"INSERT INTO {claimable(table)} ({', '.join(row)}, lease_until) VALUES "
                        f"({', '.join('?' * len(row))}, {NOW} + ?)", [*row.values(), LEASE_S])
        return self.adopt(table, row["id"], holder, 1, since)

    def adopt(self, table: str, oid: str, holder: str, generation: int, since: float) -> Claim:
        """A claim taken by a statement of the caller's own (its row's ``generation`` read back), held from now."""
        claim = Claim(self.db, table, oid, holder, generation, since)
        self.hold(claim)
        return claim

    def hold(self, claim: Claim) -> None:
        with self._guard:
            self.held.add(claim)
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, name="claims-heartbeat", daemon=True)
                self._thread.start()

    def let_go(self, claim: Claim, release: bool = True) -> None:
        """No longer renewed; its row let go too (``release``) unless another generation holds it."""
        with self._guard:
            self.held.discard(claim)
        if release and not claim.lost.is_set():
            claim.release()

    @contextlib.contextmanager
    def holding(self, claim: Claim) -> Iterator[Claim]:
        """The claim renewed while the block runs, let go after."""
        try:
            yield claim
        finally:
            self.let_go(claim)

    def _beat(self) -> None:
        """Every :data:`BEAT_S`: each held claim renewed; a failing database tried again within a second, and a claim
        whose lease ran out meanwhile lost."""
        failing = 0
        while not self._stop.wait(BEAT_S if not failing else min(BEAT_S, RETRY_S[min(failing - 1, len(RETRY_S) - 1)])):
            with self._guard:
                claims = [c for c in self.held if not c.lost.is_set()]
            failing_now = False
            for claim in claims:
                try:
                    claim.renew()
                except Exception as exc:  # noqa: BLE001 - the database failing: tried again soon
                    failing_now = True
                    if claim.left_s <= 0:
                        claim.lose(f"its lease ran out while the database could not be reached "
                                   f"({type(exc).__name__})")
                    elif not transient(exc) and not getattr(claim, "said", False):
                        claim.said = True  # once: a closed store fails every beat the same way
                        log.exception("renewing %r failed", claim)
            failing = failing + 1 if failing_now else 0
            with self._guard:
                self.held = {c for c in self.held if not c.lost.is_set()}

    def close(self) -> None:
        self._stop.set()


class Fenced:
    """A store seen by the holder of ``claim``: each method named in ``reads`` is retried while the database fails and
    the lease lasts (:meth:`Claim.read`); every other method is a write fenced by the claim (:meth:`Claim.write`).
    Attributes that are not methods (the store's folder) are the store's own."""

    def __init__(self, store, claim: Claim, reads: frozenset[str]):
        if getattr(store, "db", claim.db) is not claim.db:  # its writes would wait on the claim's own transaction
            raise ValueError("a store is fenced by a claim taken on the same database connection")
        self.store, self.claim, self.reads = store, claim, reads

    def __getattr__(self, name: str):
        value = getattr(self.store, name)
        if not callable(value):
            return value
        run = self.claim.read if name in self.reads else self.claim.write

        def fenced(*args, **kwargs):
            return run(value, *args, **kwargs)

        return fenced
