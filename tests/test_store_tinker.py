"""The Tinker API's rows (tunesmith.serve.tinker.store) on SQLite and PostgreSQL: a run created claimed and fenced,
checkpoints by path and key, a TTL that ends a checkpoint, sampler checkpoints as models of their key."""

from __future__ import annotations

import time

import pytest

from tunesmith.serve.store.claims import ClaimLost
from tunesmith.serve.tinker.store import TinkerStore, checkpoint_path, parse_path

RUN = "session-0123456789abcdef01234567:train:0"  # a run id as the server makes them


def test_runs_and_checkpoints_belong_to_their_key_and_their_claim(store, tmp_path):
    rows = TinkerStore(store)
    run, claim = rows.add_run(RUN, "owner-a", "replica-1", "base", {"rank": 8}, {"m": "1"})
    assert run["generation"] == 1 and run["claimed_by"] == "replica-1" and run["lora"] == {"rank": 8}
    assert rows.get_run(RUN, "owner-b") is None
    sampler = checkpoint_path(RUN, "sampler_weights", "final")
    assert parse_path(sampler) == (RUN, "sampler_weights", "final") and all(parse_path(p) is None for p in (
        "tinker://x/y", "tinker://s1:train:0/weights/a", f"tinker://{RUN}/weights/..", f"tinker://{RUN}/weights/.a",
        f"tinker://{RUN}/weights/a%2F..", "tinker:///etc/passwd/weights/a", f"tinker://{RUN}/../weights/a"))
    claim.write(rows.add_checkpoint, sampler, "owner-a", str(tmp_path), 10, None, None)
    state = checkpoint_path(RUN, "weights", "soon")
    claim.write(rows.add_checkpoint, state, "owner-a", str(tmp_path), 10, None, 3600)
    assert {c["path"] for c in rows.checkpoints(RUN, "owner-a")} == {sampler, state}
    assert rows.checkpoint(sampler, "owner-b") is None
    assert [c["path"] for c in store.sampler_checkpoints_of("owner-a")] == [sampler]
    assert store.sampler_checkpoint_by_model(sampler)["owner"] == "owner-a"
    assert store.sampler_checkpoint_by_model(state) is None  # a training state is not a model

    with store.db.transaction():  # the TTL passed
        store.db.execute("UPDATE tinker_checkpoints SET expires_at = ? WHERE path = ?", (int(time.time()) - 1, state))
    assert rows.checkpoint(state, "owner-a") is None and [c["path"] for c in rows.expired()] == [state]

    taken = store.claims.acquire("tinker_runs", RUN, "replica-2", force=True)  # another replica took it over
    assert taken is not None and taken.generation == 2
    with pytest.raises(ClaimLost):
        claim.write(rows.add_checkpoint, checkpoint_path(RUN, "weights", "late"), "owner-a", "x", 1, None,
                    None)
    assert rows.checkpoint(checkpoint_path(RUN, "weights", "late"), "owner-a") is None
    store.claims.let_go(taken)


def test_futures_sessions_and_recorded_samples_are_their_keys_and_a_gone_holder_is_seen(store):
    """A future's row is its key's; it is seen ended, or its holder gone once the holder's presence is another
    generation (the replica started again); sampling sessions and recorded samples keep a key's newest only."""
    rows = TinkerStore(store)
    presence = rows.present("replica-1")
    rows.add_future("req-1", "owner-a", "sample", presence)
    assert rows.future("req-1", "owner-b") is None
    pending = rows.future("req-1", "owner-a")
    assert pending["ended_at"] is None and not pending["holder_gone"]
    rows.end_future("req-1", "owner-a", "sample", presence, None, "proto", "/shared/req-1")
    ended = rows.future("req-1", "owner-a")
    assert ended["ended_at"] is not None and ended["answer_file"] == "/shared/req-1"
    rows.add_future("req-2", "owner-a", "forward_backward", presence)
    store.claims.let_go(presence)
    rows.present("replica-1")  # the same replica started again: a new generation
    assert rows.future("req-2", "owner-a")["holder_gone"]
    assert [r["id"] for r in rows.expired_futures(time.time() + 1)] == ["req-1"]
    rows.forget_futures(["req-1"])
    assert rows.future("req-1", "owner-a") is None

    rows.add_session("session-1", "owner-a", keep=2)  # client sessions: the key's own, finished once
    assert rows.session("session-1", "owner-b") is None and rows.session("session-1", "owner-a")["finished_at"] is None
    rows.finish_session("session-1", "owner-b")  # another key's finish changes nothing
    assert rows.session("session-1", "owner-a")["finished_at"] is None
    rows.finish_session("session-1", "owner-a")
    assert rows.session("session-1", "owner-a")["finished_at"] is not None

    for i in range(3):
        rows.add_sampling_session(f"sampler-{i}", "owner-a", "session-1", None, keep=2)
        time.sleep(0.01)
    assert rows.sampling_session("sampler-0", "owner-a") is None  # past the key's 2 newest
    assert rows.sampling_session("sampler-2", "owner-a")["session_id"] == "session-1"
    assert rows.sampling_session("sampler-2", "owner-b") is None
    seq = [{"tokens": [1, 2], "logprobs": [-0.5, -0.25]}]
    for i in range(3):
        rows.add_samples(f"seq-{i}", "owner-a", "session-1", [7, 8], seq, keep_s=3600, keep=2)
        time.sleep(0.01)
    found = rows.samples(["seq-0", "seq-1", "seq-2"], "owner-a", keep_s=3600)
    assert set(found) == {"seq-1", "seq-2"} and found["seq-2"]["sequences"] == seq
    assert rows.samples(["seq-2"], "owner-b", keep_s=3600) == {}
