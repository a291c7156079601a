"""A batch's lines in chunks. In the store, on both backends: a batch split once under its claim (and then claimed
by nobody), each chunk claimed by one replica of several claiming at once, a line recorded only by its chunk's
holder, a chunk done only once every line is recorded, a batch's finishing decided once when replicas finish at the
same moment, and the batches the release before marked in ``claimed_by`` given their ``claim_status``. On a server:
a chunk a dead replica left (a line written past its record) and a batch an earlier version left in progress (one
output file, its lines recorded) finished with every line once."""

from __future__ import annotations

import json
import threading
import time

import openai
import pytest

from tunesmith.serve.batches.output import BatchFiles, chunk_bounds
from tunesmith.serve.batches.store import CHUNKED, ENDED, BatchStore, ClaimLost
from tunesmith.serve.store import Store
from tunesmith.serve.store.keys import owner_id, server_secret

from .conftest import tiny_server


def split(store: Store, chunks: int, size: int = 2, owner: str = "o1") -> dict:
    """A batch of ``chunks`` chunks of ``size`` lines, split by replica r0."""
    batches = BatchStore(store)
    f = store.add_file(owner, "b.jsonl", "batch", b"")
    b = batches.add(owner, "/v1/chat/completions", f["id"], None, total=chunks * size, model="m", window_s=3600)
    stale = batches.claim_batch(b["id"], "r1")
    assert batches.claim_batch(b["id"], "r0") is None  # r1 holds it
    store.db.execute("UPDATE batches SET lease_until = 0 WHERE id = ?", (b["id"],))  # r1 frozen past its lease
    claim = batches.claim_batch(b["id"], "r0")
    assert claim.generation == stale.generation + 1
    bounds = [(1 + size * n, size, 0, size) for n in range(chunks)]
    assert not batches.add_chunks(b["id"], bounds, stale)  # only the batch's holder splits it: r1 writes nothing
    assert not batches.chunks(b["id"])
    assert batches.add_chunks(b["id"], bounds, claim)
    return batches.get(b["id"], any_owner=True)


def test_a_batch_is_split_once_and_each_chunk_claimed_by_one_of_the_replicas_claiming_at_once(store):
    batch, batches = split(store, 12), BatchStore(store)
    assert batch["status"] == "in_progress" and batch["in_progress_at"] and batch["claim_status"] == CHUNKED
    assert (batch["claimed_by"], batch["lease_until"]) == (None, None)  # held by its chunks, claimed by nobody
    assert batches.claim_batch(batch["id"], "another replica") is None  # it is never split again
    claims: dict[str, list[str]] = {}
    start = threading.Barrier(4)

    def replica(name: str) -> None:
        start.wait()
        while (claimed := batches.claim_chunk(batch["id"], name)) is not None:
            claims.setdefault(claimed[0]["id"], []).append(name)

    threads = [threading.Thread(target=replica, args=(f"r{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claims) == sorted(c["id"] for c in batches.chunks(batch["id"]))
    assert all(len(holders) == 1 for holders in claims.values()), claims
    assert batches.claim_chunk(batch["id"], "r9") is None


def test_a_line_is_recorded_by_its_chunks_holder_only_and_a_chunk_taken_over_goes_on_from_its_record(store):
    batch, batches = split(store, 1), BatchStore(store)
    chunk, first = batches.claim_chunk(batch["id"], "r1")
    batches.add_chunk_result(chunk, 1, "a", 200, 10, 0, first)
    store.db.execute("UPDATE batch_chunks SET lease_until = 0 WHERE id = ?", (chunk["id"],))  # r1 frozen past its lease
    taken, second = batches.claim_chunk(batch["id"], "r2")
    assert taken["id"] == chunk["id"] and second.generation == first.generation + 1
    assert (taken["output_bytes"], taken["error_bytes"], taken["parts_generation"]) == (10, 0, first.generation)
    assert batches.answered_in(taken) == {1}
    with pytest.raises(ClaimLost):  # r1, back, records nothing more
        batches.add_chunk_result(chunk, 2, "b", 200, 20, 0, first)
    assert first.lost.is_set()
    batches.add_chunk_result(taken, 2, "b", 400, 10, 7, second)
    assert not batches.chunk_done(taken, first) and batches.chunk_done(taken, second)
    row = batches.chunks(batch["id"])[0]
    assert (row["status"], row["answered_by"], row["claimed_by"]) == ("done", "r2", None)
    assert row["parts_generation"] == second.generation
    assert batches.claim_chunk(batch["id"], "r3") is None
    assert batches.get(batch["id"], any_owner=True)["request_counts"] == {"total": 2, "completed": 1, "failed": 1}


def answered(store: Store) -> dict:
    """A batch of two chunks, each answered by a replica of its own."""
    batch, batches = split(store, 2), BatchStore(store)
    for n, holder in enumerate(("r1", "r2")):
        chunk, claim = batches.claim_chunk(batch["id"], holder)
        for line in (1 + 2 * n, 2 + 2 * n):
            batches.add_chunk_result(chunk, line, f"c{line}", 200, 10 * line, 0, claim)
        assert batches.begin_finishing(batch["id"], holder) is None  # a chunk still held, or still to answer
        assert batches.chunk_done(chunk, claim)
    return batch


def race(batches: BatchStore, batch_id: str, finishers: int = 6) -> dict[str, tuple]:
    """Who finishes, of ``finishers`` replicas deciding at the same moment."""
    decided: dict[str, tuple] = {}
    start = threading.Barrier(finishers)

    def finisher(name: str) -> None:
        start.wait()
        if (got := batches.begin_finishing(batch_id, name)) is not None:
            decided[name] = got

    threads = [threading.Thread(target=finisher, args=(f"f{n}",)) for n in range(finishers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return decided


def test_replicas_finishing_at_once_finish_a_batch_once(store):
    batches = BatchStore(store)
    for _ in range(4):  # the race run a few times
        assert len(race(batches, answered(store)["id"])) == 1
    batch = answered(store)
    [(winner, (status, chunks, claim))] = race(batches, batch["id"]).items()
    assert status == "completed" and [(c["chunk"], c["output_bytes"]) for c in chunks] == [(0, 20), (1, 40)]
    assert batches.get(batch["id"], any_owner=True)["status"] == "finalizing"
    assert batches.begin_finishing(batch["id"], "f-other") is None  # its finisher holds it
    claim.write(batches.finished, batch["id"], status, {})
    assert batches.begin_finishing(batch["id"], "late") is None
    assert batches.get(batch["id"], any_owner=True)["claimed_by"] is None


def test_a_finisher_that_looked_just_before_the_end_was_written_takes_nothing(store, monkeypatch):
    """A replica reads the batch still finalizing, then its finisher writes the end (and removes the parts), then the
    replica claims the finishing: it gets nothing, and the batch keeps its end (before, it took the released finishing,
    wrote the batch back to finalizing and failed it on the removed parts). On PostgreSQL, where the look and the
    end's write can interleave (SQLite's write lock keeps them apart)."""
    if store.db.kind != "postgresql":
        pytest.skip("on SQLite a finisher's look and claim hold the write lock together: nothing interleaves")
    batches = BatchStore(store)
    batch = answered(store)
    status, _, claim = batches.begin_finishing(batch["id"], "first")
    real = batches.claims.acquire

    def end_written_first(table, oid, holder, *args, **kwargs):
        if table == "batch_finishes" and holder == "late":  # after the late one's look, before its claim
            ending = threading.Thread(target=claim.write, args=(batches.finished, batch["id"], status, {}))
            ending.start()
            ending.join(30)
        return real(table, oid, holder, *args, **kwargs)

    monkeypatch.setattr(batches.claims, "acquire", end_written_first)
    assert batches.begin_finishing(batch["id"], "late") is None
    assert batches.get(batch["id"], any_owner=True)["status"] == status == "completed"
    assert batches.claims.held == {c for c in batches.claims.held if c.holder != "late"}  # nothing left renewed


def test_the_release_befores_sentinels_in_claimed_by_become_claim_statuses(store):
    """A store as the release before left it: a batch run by chunks and a batch's finishing over each held by a
    sentinel in ``claimed_by`` (``chunks``, ``ended``) with an endless lease. Migrated, each has its ``claim_status``
    and no holder, and is still never claimed again; a batch a replica holds keeps its claim."""
    batches = BatchStore(store)
    chunked, ended = split(store, 1), answered(store)
    [(_, (status, _, finisher))] = race(batches, ended["id"], finishers=1).items()
    finisher.write(batches.finished, ended["id"], status, {})
    f = store.add_file("o1", "b.jsonl", "batch", b"")
    held = batches.add("o1", "/v1/chat/completions", f["id"], None, total=1, model="m", window_s=3600)
    claim = batches.claim_batch(held["id"], "r1")
    for table in ("batches", "batch_finishes"):
        store.db.execute(f"ALTER TABLE {table} DROP COLUMN claim_status")
    store.db.execute("UPDATE batches SET claimed_by = 'chunks', lease_until = 1e15 WHERE id = ?", (chunked["id"],))
    store.db.execute("UPDATE batch_finishes SET claimed_by = 'ended', lease_until = 1e15 WHERE id = ?", (ended["id"],))
    store.db.execute("DELETE FROM schema_migrations WHERE name = '0068_claim_statuses'")

    assert store.migrate() == ["0068_claim_statuses"]
    rows = {r["id"]: dict(r) for r in store.db.execute("SELECT id, claim_status, claimed_by, lease_until FROM batches")}
    assert (rows[chunked["id"]]["claim_status"], rows[chunked["id"]]["claimed_by"]) == (CHUNKED, None)
    assert rows[chunked["id"]]["lease_until"] is None and rows[ended["id"]]["claimed_by"] is None
    assert (rows[held["id"]]["claim_status"], rows[held["id"]]["claimed_by"]) == (None, "r1")
    finishing = store.db.execute("SELECT claim_status, claimed_by, lease_until FROM batch_finishes WHERE id = ?",
                                 (ended["id"],)).fetchone()
    assert tuple(finishing) == (ENDED, None, None)
    assert batches.claim_batch(chunked["id"], "r2") is None and batches.begin_finishing(ended["id"], "r2") is None
    assert batches.claim_chunk(chunked["id"], "r2") is not None  # its chunks are claimed as before
    assert claim.renew() and claim.generation == 1


def test_a_cancelled_or_expired_batch_is_finished_once_no_replica_holds_a_chunk(store):
    batch, batches = split(store, 2), BatchStore(store)
    _, claim = batches.claim_chunk(batch["id"], "r1")
    batches.mark(batch["id"], "cancelling")
    assert batches.begin_finishing(batch["id"], "r2") is None  # r1's lines in flight end first
    store.claims.let_go(claim)
    assert batches.claim_chunk(batch["id"], "r1") is None  # no chunk starts once cancelled
    assert batches.begin_finishing(batch["id"], "r2")[0] == "cancelled"
    late = split(store, 2)
    store.db.execute("UPDATE batches SET expires_at = ? WHERE id = ?", (int(time.time()) - 1, late["id"]))
    assert batches.begin_finishing(late["id"], "r2")[0] == "expired"


def batch_lines(model: str, n: int) -> bytes:
    return "".join(json.dumps({"custom_id": f"q-{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": model, "messages": [{"role": "user", "content": f"card question {i}"}], "max_tokens": 6}}) + "\n"
        for i in range(n)).encode()


def left_batch(tiny_model_dir, data_dir, n: int) -> tuple[Store, BatchStore, dict]:
    """A batch of ``n`` lines of key k1 in the store of ``data_dir``, before any server ran it."""
    store = Store(data_dir)
    owner = owner_id(server_secret(data_dir), "k1")
    f = store.add_file(owner, "b.jsonl", "batch", batch_lines(str(tiny_model_dir), n))
    batches = BatchStore(store)
    return store, batches, batches.add(owner, "/v1/chat/completions", f["id"], None, n, str(tiny_model_dir), 3600)


def finished_ids(url: str, batch_id: str) -> tuple[object, list[str], list[dict]]:
    c = openai.OpenAI(base_url=url, api_key="k1", max_retries=0, timeout=60)
    deadline = time.time() + 180
    while (b := c.batches.retrieve(batch_id)).status not in ("completed", "failed", "expired", "cancelled"):
        assert time.time() < deadline, b
        time.sleep(0.2)
    lines = [json.loads(x) for x in c.files.content(b.output_file_id).read().splitlines()] if b.output_file_id else []
    return b, [x["custom_id"] for x in lines], lines


def test_a_chunk_a_dead_replica_left_is_cut_back_to_its_record_and_finished(tiny_model_dir, tmp_path):
    """Chunk 0 holds two recorded answers and a third written past its record (its replica died before recording
    it): the server takes the chunk over once the lease ran out, drops the third and answers the rest once."""
    data_dir = tmp_path / "data"
    store, batches, batch = left_batch(tiny_model_dir, data_dir, 10)
    bid, path = batch["id"], store.get_file(batch["input_file_id"], batch["owner"])["storage"]
    assert batches.add_chunks(bid, chunk_bounds(path, 4), batches.claim_batch(bid, "dead"))
    chunk, claim = batches.claim_chunk(bid, "dead")
    part = BatchFiles(data_dir, bid, 0, claim.generation)
    part.cut_to(0, 0)
    for line in (1, 2):
        sizes = part.append(f"q-{line - 1}", 200, b'{"answered": "by the dead replica"}')
        batches.add_chunk_result(chunk, line, f"q-{line - 1}", 200, *sizes, claim)
    part.append("q-2", 200, b'{"answered": "never recorded"}')
    store.close()  # the replica dies: its heartbeat stops, its lease runs out
    later = Store(data_dir)
    later.db.execute("UPDATE batch_chunks SET lease_until = 0 WHERE id = ?", (chunk["id"],))
    later.close()
    with tiny_server(tiny_model_dir, data_dir, api_keys=frozenset({"k1"}), batch_chunk_lines=3) as url:
        done, ids, lines = finished_ids(url, bid)
    assert done.status == "completed" and done.request_counts.completed == 10, done
    assert ids == sorted(ids, key=lambda c: int(c[2:]) // 4) and sorted(ids) == sorted(f"q-{i}" for i in range(10))
    bodies = [x["response"]["body"] for x in lines]
    assert bodies.count({"answered": "by the dead replica"}) == 2 and {"answered": "never recorded"} not in bodies
    assert not list((data_dir / "batches").glob(f"{bid}/*"))  # the parts removed once the batch's files are kept


def test_a_batch_an_earlier_version_left_in_progress_goes_on_by_chunks(tiny_model_dir, tmp_path):
    """An earlier version answered three lines into the batch's one output file (a fourth written past its record)
    and stopped: the new one answers the other lines by chunks, the earlier answers first in the output."""
    data_dir = tmp_path / "data"
    store, batches, batch = left_batch(tiny_model_dir, data_dir, 9)
    bid = batch["id"]
    batches.mark(bid, "in_progress")
    head = BatchFiles(data_dir, bid)
    head.cut_to(0, 0)
    for line in (1, 2, 3):
        sizes = head.append(f"q-{line - 1}", 200, b'{"answered": "earlier"}')
        batches.add_result(bid, line, f"q-{line - 1}", 200, *sizes)
    head.append("q-3", 200, b'{"answered": "never recorded"}')
    store.db.close()
    with tiny_server(tiny_model_dir, data_dir, api_keys=frozenset({"k1"}), batch_chunk_lines=4) as url:
        done, ids, lines = finished_ids(url, bid)
    assert done.status == "completed" and done.request_counts.completed == 9, done
    assert ids[:3] == ["q-0", "q-1", "q-2"] and sorted(ids) == sorted(f"q-{i}" for i in range(9))
    assert [x["response"]["body"] for x in lines].count({"answered": "earlier"}) == 3
    assert {"answered": "never recorded"} not in [x["response"]["body"] for x in lines]


def test_a_batch_is_cancelled_only_from_a_status_that_is_not_final(store):
    batches = BatchStore(store)
    batch = split(store, 1)
    assert batches.cancel(batch["id"]) and batches.get(batch["id"], any_owner=True)["status"] == "cancelling"
    done = split(store, 1)
    batches.mark(done["id"], "completed")  # it ended a moment before the cancel came
    assert not batches.cancel(done["id"])
    assert batches.get(done["id"], any_owner=True)["status"] == "completed"
