"""The store on both backends: SQLite (embedded default) and PostgreSQL (--database), the same migrations and the
same answers from every store module; the SQL translation on its own."""

import json
import threading

import pytest

from tunesmith.serve.api.stored_completions import CompletionStore
from tunesmith.serve.batches.store import BatchStore
from tunesmith.serve.jobs.store import JobStore
from tunesmith.serve.store import ClaimLost, Store
from tunesmith.serve.store.database import DatabaseError, open_database, to_postgres
from tunesmith.serve.store.migrations import MIGRATIONS

from .conftest import queued_jobs


def test_translation_to_postgres():
    assert to_postgres("SELECT * FROM t WHERE id = ? AND owner IS ?") == \
        "SELECT * FROM t WHERE id = %(p0)s AND (owner = %(p1)s OR (owner IS NULL AND %(p1)s IS NULL))"
    assert to_postgres("DELETE FROM e WHERE k LIKE 'ckpt:%' AND t.o IS NOT ?") == \
        "DELETE FROM e WHERE k LIKE 'ckpt:%%' AND t.o IS DISTINCT FROM %(p0)s"
    assert to_postgres("INSERT OR IGNORE INTO c VALUES (?, ?)") == \
        "INSERT INTO c VALUES (%(p0)s, %(p1)s) ON CONFLICT DO NOTHING"
    ddl = to_postgres("CREATE TABLE e (seq INTEGER PRIMARY KEY AUTOINCREMENT, n INTEGER NOT NULL, at REAL)")
    assert ddl == "CREATE TABLE e (seq BIGSERIAL PRIMARY KEY, n BIGINT NOT NULL, at DOUBLE PRECISION, rowid BIGSERIAL)"


def test_an_owner_lookup_on_postgresql_uses_its_index(postgres, tmp_path):
    s = Store(tmp_path / "data", postgres())
    with s.db.transaction():  # one connection: the setting and the plan
        s.db.execute("SET LOCAL enable_seqscan = off")  # a plan that can use the index must (an empty table)
        plan = " ".join(r[0] for r in s.db.execute("EXPLAIN SELECT * FROM files WHERE owner IS ? AND bytes > ?",
                                                   ("o1", 0)))
    assert "files_by_owner" in plan, plan
    s.db.close()


def test_a_database_url_that_is_not_postgresql_is_refused(tmp_path):
    with pytest.raises(DatabaseError, match="only postgresql://"):
        open_database("mysql://x", tmp_path)


def test_an_unreachable_postgresql_is_said_without_its_password(tmp_path):
    with pytest.raises(DatabaseError, match=r"cannot reach PostgreSQL at postgresql://u:\*\*\*@") as err:
        open_database(f"postgresql://u:secret@/db?host={tmp_path}&connect_timeout=2", tmp_path)
    assert "secret" not in str(err.value)


def test_every_migration_once_and_a_reopened_store_migrates_nothing(store):
    assert {"files", "jobs", "events", "batches", "stored_completions"} <= set(store.db.tables())
    names = sorted(r[0] for r in store.db.execute("SELECT name FROM schema_migrations"))
    assert names == sorted(n for n, _ in MIGRATIONS)
    url = None if store.db.kind == "sqlite" else store.db.url
    again = Store(store.root, url)
    assert again.migrate() == []
    again.db.close()


def test_files_jobs_events_and_checkpoints(store):
    jobs = JobStore(store)
    f = store.add_file("o1", "a.jsonl", "fine-tune", b'{"x": 1}\n')
    assert store.get_file(f["id"], "o1")["bytes"] == 9 and store.get_file(f["id"], "o2") is None
    assert store.get_file(store.add_file(None, "b.jsonl", "batch", b"")["id"], None)["owner"] is None  # IS NULL
    assert [x["id"] for x in store.list_files("o1")[0]] == [f["id"]]
    assert "rowid" not in store.list_files("o1")[0][0]
    job = jobs.add_job("o1", model="m", training_file=f["id"], validation_file=None, suffix=None, seed=1,
                       method={"type": "supervised"}, metadata={"k": "v"})
    assert jobs.get_job(job["id"], "o1")["method"] == {"type": "supervised"}
    store.update_job(job["id"], status="queued")
    assert jobs.next_job(1)["id"] == job["id"]
    assert jobs.add_event(job["id"], "step", "metrics", {"step": 1}, dedup_key="s1")
    assert not jobs.add_event(job["id"], "step again", "metrics", {"step": 1}, dedup_key="s1")  # once
    for step in (2, 3):
        jobs.add_event(job["id"], "step", "metrics", {"step": step}, dedup_key=f"s{step}")
        jobs.add_checkpoint(job["id"], step, {"loss": 1.0}, "/nowhere", "ft:m")
    jobs.supersede_steps(job["id"], after=2)
    assert [e["data"]["step"] for e in jobs.events(job["id"])] == [2, 1]
    assert [c["step_number"] for c in jobs.checkpoints(job["id"])] == [2]
    assert store.checkpoint_by_model("ft:m:ckpt-step-2")["owner"] == "o1"
    assert store.delete_file(f["id"], "o1") and store.get_file(f["id"], "o1") is None


def test_stored_completions_select_by_metadata_with_a_cursor(store):
    completions = CompletionStore(store)
    for i in range(5):
        completions.add("o1", {"id": f"c{i}", "model": "m", "created": 100 + i // 2,
                               "metadata": {"team": "a" if i % 2 else "b", "n": str(i)}}, {"messages": []})
    completions.add("o2", {"id": "x", "model": "m", "created": 1, "metadata": {"team": "a"}}, {"messages": []})
    assert [r["id"] for r in completions.select("o1", {"team": "a"})] == ["c1", "c3"]
    assert [r["id"] for r in completions.select("o1", order="desc", limit=2)] == ["c4", "c3"]
    assert [r["id"] for r in completions.select("o1", after="c1", limit=2)] == ["c2", "c3"]  # same second: insertion
    assert completions.select("o1", {"team": "a", "n": "3"})[0]["id"] == "c3"
    completions.add("o1", {"id": "c0", "model": "m2", "created": 100, "metadata": {}}, {"messages": []})  # replaced
    assert completions.get("c0", "o1")["model"] == "m2"


def test_batch_results_and_counts_commit_together(store):
    batches = BatchStore(store)
    f = store.add_file("o1", "b.jsonl", "batch", b"")
    b = batches.add("o1", "/v1/chat/completions", f["id"], None, total=3, model="m", window_s=3600)
    batches.add_result(b["id"], 0, "a", 200, 10, 0)
    batches.add_result(b["id"], 1, "b", 400, 10, 7)
    batches.add_result(b["id"], 1, "b", 200, 20, 0)  # answered again after a restart: replaced
    got = batches.get(b["id"], any_owner=True)
    assert got["request_counts"] == {"total": 3, "completed": 2, "failed": 0}
    assert (got["output_bytes"], got["error_bytes"]) == (20, 0)
    assert batches.answered_lines(b["id"]) == {0, 1}


def test_threads_writing_at_once(store):
    """The server's lanes write from many threads: every row kept, none twice."""
    def write(n):
        for i in range(20):
            store.add_file(f"o{n}", f"{i}.jsonl", "batch", b"x")

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = store.db.execute("SELECT COUNT(*), SUM(bytes) FROM files").fetchone()
    assert (total[0], total[1]) == (160, 160) and isinstance(total[1], int)
    assert json.dumps(dict(store.db.execute("SELECT SUM(bytes) AS b FROM files").fetchone()))  # ints, not Decimals


def test_a_job_is_claimed_by_one_worker_and_taken_over_when_its_lease_runs_out(store):
    jobs, ids = JobStore(store), queued_jobs(store, ("o1", "o1", "o2"))
    first, claim = jobs.claim_job("w1", jobs_per_key=1)
    assert first["id"] == ids[0] and claim.generation == 1 and first["generation"] == 1
    second, _ = jobs.claim_job("w2", jobs_per_key=1)
    assert second["id"] == ids[2]  # o1's next waits: its first, held by w1, counts as running
    assert jobs.claim_job("w3", jobs_per_key=1) is None
    claim.write(store.update_job, first["id"], status="running")
    assert claim.renew()
    store.db.execute("UPDATE jobs SET lease_until = 0 WHERE id = ?", (first["id"],))  # w1 frozen past its lease
    taken, again = jobs.claim_job("w3", jobs_per_key=1)
    assert taken["id"] == first["id"] and taken["status"] == "running" and again.generation == 2
    with pytest.raises(ClaimLost):  # w1, back, writes nothing more
        claim.write(store.update_job, first["id"], status="succeeded")
    assert not claim.renew() and claim.lost.is_set()
    assert jobs.get_job(first["id"], any_owner=True)["status"] == "running"


def test_a_sole_worker_takes_back_a_job_a_dead_one_held(store):
    jobs = JobStore(store)
    job = jobs.add_job("o1", model="m", training_file="f", validation_file=None, suffix=None, seed=1,
                       method={"type": "supervised"}, metadata=None)
    store.update_job(job["id"], status="running")
    assert store.claims.acquire("jobs", job["id"], "dead") is not None
    assert jobs.claim_job("new", 1) is None  # held by a live lease
    assert jobs.claim_job("new", 1, sole=True)[0]["id"] == job["id"]  # the data folder's only worker: "dead" is


def test_workers_claiming_at_once_take_each_job_once(store):
    jobs = JobStore(store)
    queued_jobs(store, [f"o{i}" for i in range(12)])
    taken: list[str] = []
    lock = threading.Lock()

    def claimer(n):
        while (claimed := jobs.claim_job(f"w{n}", jobs_per_key=1)) is not None:
            job = claimed[0]
            store.update_job(job["id"], status="running")
            with lock:
                taken.append(job["id"])

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(taken) == 12 and len(set(taken)) == 12


def test_a_keys_places_are_counted_over_replicas(postgres, tmp_path):
    import tunesmith.serve.api.shared_limits as shared_limits
    from tunesmith.serve.errors import APIError

    s = Store(tmp_path / "data", postgres())
    one, two = shared_limits.SharedPlaces(s, "r1"), shared_limits.SharedPlaces(s, "r2")
    assert one.take("k", 3) is None and one.take("k", 3) is None
    assert two.take("k", 3) is None
    assert two.take("k", 3) == 3  # the third place was the last, whichever replica asks
    assert one.take("other", 3) is None  # another key counts apart
    one.give_back("k")
    one.returns.submit(lambda: None).result()  # the give-back written
    assert two.take("k", 3) is None
    s.db.execute("UPDATE key_places SET seen = 0")  # r1 and r2 stopped renewing: their lease ran out
    assert shared_limits.SharedPlaces(s, "r3").take("k", 1) is None
    s.db.close()
    with pytest.raises(APIError) as err:  # the database gone: refused and said, never counted per replica
        one.take("k", 3)
    assert err.value.status == 503 and err.value.body["code"] == "limits_unavailable"


def test_a_place_whose_give_back_failed_is_counted_no_longer_than_the_next_renewal(postgres, tmp_path, monkeypatch):
    import tunesmith.serve.api.shared_limits as shared_limits
    from tunesmith.serve.store.database import StoreUnavailable

    s = Store(tmp_path / "data", postgres())
    one = shared_limits.SharedPlaces(s, "r1")
    assert one.take("k", 2) is None and one.take("k", 2) is None and one.take("k", 2) == 2
    real = s.db.transaction

    def away():
        raise StoreUnavailable("the database restarting")

    monkeypatch.setattr(s.db, "transaction", away)  # the give-backs' writes fail: the database is away
    one.give_back("k")
    one.give_back("k")
    one.returns.submit(lambda: None).result()
    monkeypatch.setattr(s.db, "transaction", real)
    assert s.db.execute("SELECT in_flight FROM key_places WHERE owner = 'k'").fetchone()[0] == 2  # still counted
    one.renew()  # the replica's rows set to its true count: none of the key's requests is in flight
    assert s.db.execute("SELECT COUNT(*) FROM key_places WHERE owner = 'k'").fetchone()[0] == 0
    assert one.take("k", 2) is None and one.take("k", 2) is None  # the key's whole limit back
    s.db.close()


def test_eval_runs_a_dead_replica_held_are_claimed_by_a_live_one_and_live_ones_kept(store):
    from tunesmith.serve.evals import resume
    from tunesmith.serve.evals.store import EvalStore

    evals = EvalStore(store)
    ev = evals.add_eval("o1", name="e", data_source_config={}, testing_criteria=[], metadata=None)
    made = [evals.add_run("o1", ev["id"], holder, name=f"r{i}", model="m", data_source={}, metadata=None)
            for i, holder in enumerate(("alive", "dead"))]
    runs = [run for run, _ in made]
    for run in runs:
        evals.update_run(run["id"], status="in_progress")
    store.db.execute("UPDATE eval_runs SET lease_until = 0 WHERE id = ?", (runs[1]["id"],))  # "dead" stopped renewing
    assert resume.claim_abandoned(store, "another", running=frozenset({runs[1]["id"]})) == []  # its own: renewed
    taken = resume.claim_abandoned(store, "another")
    assert [r["id"] for r, _ in taken] == [runs[1]["id"]]  # the dead replica's run, claimed by a live one
    assert resume.claim_abandoned(store, "a third") == []  # claimed once
    assert made[0][1].renew() and not made[1][1].renew()  # the live one keeps its own; the dead one's is gone

def test_work_that_ended_between_a_look_and_its_claim_is_not_taken(store, monkeypatch):
    """A job cancelled, or an eval run completed (its claim let go), after a claimer chose it and before its claim:
    the claim's own statement checks the status again, so the job never starts and the run's output items are not
    deleted to run it again."""
    from tunesmith.serve.evals import resume
    from tunesmith.serve.evals.store import EvalStore

    jobs = JobStore(store)
    [job_id] = queued_jobs(store, ("o1",))
    real_next = jobs.next_job

    def chosen_then_cancelled(*args, **kwargs):
        job = real_next(*args, **kwargs)
        store.update_job(job_id, status="cancelled")
        return job

    monkeypatch.setattr(jobs, "next_job", chosen_then_cancelled)
    assert jobs.claim_job("w1", jobs_per_key=1) is None
    assert jobs.get_job(job_id, any_owner=True)["claimed_by"] is None

    evals = EvalStore(store)
    ev = evals.add_eval("o1", name="e", data_source_config={}, testing_criteria=[], metadata=None)
    run, claim = evals.add_run("o1", ev["id"], "r1", name="r", model="m", data_source={}, metadata=None)
    evals.update_run(run["id"], status="in_progress")
    store.db.execute("UPDATE eval_runs SET lease_until = 0 WHERE id = ?", (run["id"],))  # looks abandoned
    real_acquire = store.claims.acquire

    def ended_first(table, oid, holder, *args, **kwargs):
        claim.write(evals.update_run, run["id"], status="completed")
        store.claims.let_go(claim)
        return real_acquire(table, oid, holder, *args, **kwargs)

    monkeypatch.setattr(store.claims, "acquire", ended_first)
    assert resume.claim_abandoned(store, "r2") == []
    assert evals.get_run(ev["id"], run["id"])["status"] == "completed"


def test_one_keys_admissions_waiting_on_the_database_do_not_delay_another_keys(postgres, tmp_path):
    """Key A's 40 admissions all wait on A's advisory lock (held elsewhere, as a slow transaction would): they wait
    in the admission lane, one at a time, so key B's admission finds a thread and a connection at once (without the
    lane they filled the default thread pool and B waited for A's lock timeout)."""
    import asyncio
    import time

    import psycopg

    from tunesmith.serve.api.rate_limits import KeyLimiter, KeyLimits
    from tunesmith.serve.api.shared_limits import SharedPlaces
    from tunesmith.serve.store.database import _lock_id

    url = postgres()
    s = Store(tmp_path / "data", url)
    limiter = KeyLimiter(KeyLimits(requests=1000))
    limiter.shared = SharedPlaces(s, "r1")

    async def burst_then_other() -> float:
        with psycopg.connect(url, autocommit=True) as other:  # A's lock held by another replica's long transaction
            other.execute("SELECT pg_advisory_lock(%s)", (_lock_id("key_places:A"),))
            burst = [asyncio.ensure_future(limiter.admitted("A")) for _ in range(40)]
            await asyncio.sleep(0.3)  # A's admissions are all waiting now
            start = time.perf_counter()
            ticket = await limiter.admitted("B")
            took = time.perf_counter() - start
            ticket.release()
            other.execute("SELECT pg_advisory_unlock(%s)", (_lock_id("key_places:A"),))
        for t in await asyncio.gather(*burst, return_exceptions=True):
            if not isinstance(t, BaseException):
                t.release()
        return took

    took = asyncio.run(burst_then_other())
    assert took < 0.5, f"key B waited {took:.3f} s behind key A's admissions"
    limiter.shared.close()
    s.close()


def test_a_notification_is_heard_by_every_listener_at_its_commit_and_a_cut_listener_listens_again(postgres, tmp_path):
    """PostgreSQL's notifications through the store (what wakes a replica when another one logs a Tinker call or ends
    its future): heard by every listener, a transaction's only once it commits, never a rolled-back one's; a
    listener whose connection the database kills connects again and says that some may have been missed; SQLite has
    nothing to listen to."""
    import queue
    import time

    import psycopg

    db = open_database(postgres(), tmp_path / "data")
    heard = [queue.Queue(), queue.Queue()]
    listeners = [db.listen(["tinker_logged"], lambda c, p, q=q: q.put((c, p))) for q in heard]
    try:
        for q in heard:
            assert q.get(timeout=10) == (None, None)  # listening: nothing before this was heard
        with db.transaction():
            db.notify("tinker_logged", "run-1")
            time.sleep(0.3)
            assert all(q.empty() for q in heard)  # not before the commit
        with pytest.raises(RuntimeError), db.transaction():
            db.notify("tinker_logged", "rolled-back")
            raise RuntimeError("rolled back")
        db.notify("tinker_logged", "run-2")
        for q in heard:
            assert [q.get(timeout=10), q.get(timeout=10)] == [("tinker_logged", "run-1"), ("tinker_logged", "run-2")]
        with psycopg.connect(db.url, autocommit=True) as admin:  # the database ends the listeners' connections
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%' AND "
                          "pid <> pg_backend_pid()")
        for q in heard:
            assert q.get(timeout=15) == (None, None)
        db.notify("tinker_logged", "run-3")
        assert [q.get(timeout=10) for q in heard] == [("tinker_logged", "run-3")] * 2
    finally:
        for listener in listeners:
            listener.close()
        db.close()
    (tmp_path / "sqlite").mkdir()
    sqlite = open_database(None, tmp_path / "sqlite")
    sqlite.notify("tinker_logged", "x")
    assert sqlite.listen(["tinker_logged"], print) is None
