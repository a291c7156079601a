"""One claim type for all claimed work (tunesmith.serve.store.claims), on both backends: a generation per claim, the
lease in the database's clock, writes fenced by the generation, a heartbeat that rides out a failing database and
gives the claim up only when its lease has surely run out."""

from __future__ import annotations

import threading
import time

import pytest

from tunesmith.serve.jobs.store import JobStore
from tunesmith.serve.store import ClaimLost, Store
from tunesmith.serve.store import claims as claims_module
from tunesmith.serve.store.database import StoreUnavailable

from .conftest import queued_jobs


def job_of(store: Store) -> str:
    return queued_jobs(store, ("o1",))[0]


def expire(store: Store, jid: str) -> None:
    """The holder froze past its lease (its heartbeat did not renew it)."""
    store.db.execute("UPDATE jobs SET lease_until = 0 WHERE id = ?", (jid,))


def test_each_claim_is_a_new_generation_and_a_stale_holder_writes_nothing(store):
    jobs = JobStore(store)
    jid = job_of(store)
    first = store.claims.acquire("jobs", jid, "r1")
    assert first.generation == 1 and store.claims.acquire("jobs", jid, "r2") is None  # held
    first.write(store.update_job, jid, status="running")
    expire(store, jid)
    second = store.claims.acquire("jobs", jid, "r2")
    assert second.generation == 2
    with pytest.raises(ClaimLost):
        first.write(jobs.add_event, jid, "late", dedup_key="late")
    assert first.lost.is_set() and not first.renew()
    assert not [e for e in jobs.events(jid) if e["message"] == "late"]
    second.write(store.update_job, jid, status="succeeded")
    first.release()  # a stale holder's let-go leaves the new holder's claim alone
    assert jobs.get_job(jid, any_owner=True)["claimed_by"] == "r2"
    assert second.renew()


def test_a_lapsed_lease_nobody_took_is_renewed_by_its_holder(store):
    jid = job_of(store)
    claim = store.claims.acquire("jobs", jid, "r1")
    expire(store, jid)  # the database was away past the lease, and no replica claimed it meanwhile
    assert claim.renew() and not claim.lost.is_set()
    assert store.claims.acquire("jobs", jid, "r2") is None


def test_leases_are_in_the_databases_clock_not_the_replicas(store, monkeypatch):
    jid = job_of(store)
    held = store.claims.acquire("jobs", jid, "r1")
    ahead = time.time() + 3600
    monkeypatch.setattr(time, "time", lambda: ahead)  # this replica's clock an hour ahead
    assert store.claims.acquire("jobs", jid, "r2") is None  # the lease has not run out for the database
    assert held.renew()


def test_the_heartbeat_rides_out_a_failing_database_and_gives_up_only_past_the_lease(store, monkeypatch):
    monkeypatch.setattr(claims_module, "LEASE_S", 2.0)
    monkeypatch.setattr(claims_module, "BEAT_S", 0.2)
    jid, away = job_of(store), threading.Event()
    real = store.db.execute

    def execute(sql, params=()):
        if away.is_set() and sql.startswith("UPDATE jobs SET lease_until"):
            raise StoreUnavailable("the database restarting")
        return real(sql, params)

    monkeypatch.setattr(store.db, "execute", execute)
    claim = store.claims.acquire("jobs", jid, "r1")
    away.set()
    time.sleep(1.0)  # half a lease without a renewal
    assert not claim.lost.is_set()
    away.clear()
    time.sleep(0.5)
    assert not claim.lost.is_set() and claim.left_s > 1.0  # renewed once the database answered
    away.set()
    time.sleep(2.6)  # past the lease without a renewal: it may have been taken over
    assert claim.lost.is_set() and "could not be reached" in claim.reason
    away.clear()
    with pytest.raises(ClaimLost):
        claim.write(store.update_job, jid, status="running")
    store.claims.let_go(claim)


def test_a_fenced_write_is_tried_again_while_the_lease_lasts(store, monkeypatch):
    jobs = JobStore(store)
    jid = job_of(store)
    claim = store.claims.acquire("jobs", jid, "r1")
    fails = [StoreUnavailable("connection cut"), StoreUnavailable("connection cut")]
    real = store.db.transaction

    def transaction():
        if fails:
            raise fails.pop()
        return real()

    monkeypatch.setattr(store.db, "transaction", transaction)
    claim.write(jobs.add_event, jid, "kept", dedup_key="kept")
    assert [e["message"] for e in jobs.events(jid)] == ["kept"] and not claim.lost.is_set()


def test_a_takeover_waits_for_a_write_in_progress_and_refuses_the_next(postgres, tmp_path):
    """PostgreSQL: the fenced write holds the row; a replica claiming it meanwhile waits for its commit, so the write
    is before the takeover, and the next write of the old holder is refused."""
    store = JobStore(Store(tmp_path / "data", postgres()))
    jid = job_of(store)
    old = store.claims.acquire("jobs", jid, "r1")
    expire(store, jid)
    inside, took = threading.Event(), []

    def write():
        inside.set()
        time.sleep(1.0)  # the takeover waits for this transaction
        store.add_event(jid, "before the takeover", dedup_key="before")

    writer = threading.Thread(target=old.write, args=(write,))
    writer.start()
    inside.wait()
    started = time.monotonic()
    took.append(store.claims.acquire("jobs", jid, "r2"))
    waited = time.monotonic() - started
    writer.join()
    assert took[0] is not None and took[0].generation == old.generation + 1 and waited > 0.5
    assert [e["message"] for e in store.events(jid)] == ["before the takeover"]
    with pytest.raises(ClaimLost):
        old.write(store.add_event, jid, "after", dedup_key="after")
    store.close()
