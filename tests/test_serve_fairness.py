"""Admission and fairness of fine-tuning jobs: round robin over API keys, a per-key limit on running jobs,
and each queued job's place in the queue in the job object (through the official `openai` client)."""

import json
from types import SimpleNamespace

import openai
import pytest

from tunesmith.serve.app import ServeSettings, create_app
from tunesmith.serve.jobs.store import JobStore
from tunesmith.serve.store import Store

from .conftest import running_server

CHAT = b"".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                         {"role": "assistant", "content": "a"}]}).encode() + b"\n"
                for i in range(10))


def _queue(store: JobStore, owner: str) -> str:
    job = store.add_job(owner, model="m", training_file="f", seed=0, method={"type": "supervised"})
    store.update_job(job["id"], status="queued")
    return job["id"]


def test_one_key_with_many_jobs_does_not_starve_another(tmp_path):
    store = JobStore(Store(tmp_path))
    a = [_queue(store, "A") for _ in range(3)]
    b = [_queue(store, "B") for _ in range(2)]
    c = _queue(store, "C")
    everyone = [*a, *b, c]
    places = store.queue_positions(everyone)
    assert sorted(places, key=places.get) == [a[0], b[0], c, a[1], b[1], a[2]]
    store.update_job(a[0], status="running")  # A has a job running: its next jobs wait behind the others
    assert store.queue_positions(everyone) == {b[0]: 1, c: 2, a[1]: 3, b[1]: 4, a[2]: 5}
    assert store.queue_positions([a[2]]) == {a[2]: 5}  # one job's place, ranked in SQL
    assert store.next_job()["id"] == a[0]  # a job left running by a crash resumes first
    store.update_job(a[0], status="succeeded")
    assert store.next_job(jobs_per_key=1)["id"] == a[1]  # A runs nothing now: its oldest queued job is first


def test_per_key_limit_skips_a_key_at_its_limit(tmp_path):
    store = JobStore(Store(tmp_path))
    a = [_queue(store, "A") for _ in range(3)]
    b = _queue(store, "B")
    c = _queue(store, "C")
    held = {jid: store.claims.acquire("jobs", jid, "this executor") for jid in (a[0], b)}  # it runs several at once
    for jid in (a[0], b):
        store.update_job(jid, status="running")
    assert store.next_job(jobs_per_key=1)["id"] == c
    held[c] = store.claims.acquire("jobs", c, "this executor")
    store.update_job(c, status="running")
    assert store.next_job(jobs_per_key=1) is None  # every key with queued work is at its limit
    assert store.next_job(jobs_per_key=2)["id"] == a[1]
    store.db.execute("UPDATE jobs SET lease_until = 0 WHERE id = ?", (b,))  # its holder died: a crash left it running
    assert store.next_job(jobs_per_key=1)["id"] == b
    store.close()


def test_queue_position_in_the_job_object(tmp_path, tiny_model_dir):
    settings = ServeSettings(model=str(tiny_model_dir), api_keys=frozenset({"k1", "k2"}), data_dir=tmp_path)
    app = create_app(settings, engine=SimpleNamespace(close=lambda: None))
    with running_server(app) as url:
        c1, c2 = (openai.OpenAI(base_url=url, api_key=k, max_retries=0) for k in ("k1", "k2"))
        f1 = c1.files.create(file=("t.jsonl", CHAT), purpose="fine-tune")
        f2 = c2.files.create(file=("t.jsonl", CHAT), purpose="fine-tune")
        first = [c1.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f1.id) for _ in range(3)]
        other = c2.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f2.id)
        assert [j.queue_position for j in first] == [1, 2, 3]  # each as created
        assert other.queue_position == 2  # k2's first job goes ahead of k1's second and third
        listed = {j.id: j.queue_position for j in c1.fine_tuning.jobs.list().data}
        assert listed == {first[0].id: 1, first[1].id: 3, first[2].id: 4}
        assert c2.fine_tuning.jobs.retrieve(other.id).queue_position == 2
        assert c1.fine_tuning.jobs.cancel(first[0].id).queue_position is None  # not queued any more
        # k1's second job is now its first in the queue, and older than k2's: k2's stays second, ahead of k1's third
        assert c1.fine_tuning.jobs.retrieve(first[1].id).queue_position == 1
        assert c2.fine_tuning.jobs.retrieve(other.id).queue_position == 2
        assert c1.fine_tuning.jobs.retrieve(first[2].id).queue_position == 3
        job = c1.fine_tuning.jobs.retrieve(first[1].id).model_dump()
        assert set(job) >= {"id", "object", "status", "hyperparameters", "method", "queue_position"}
        with pytest.raises(openai.NotFoundError):
            c2.fine_tuning.jobs.retrieve(first[1].id)
