"""queue_position: where a queued job stands in the worker's order (the running job and older queued jobs ahead)."""

from tunesmith.serve.objects import job_object
from tunesmith.serve.routes_jobs import _with_queue
from tunesmith.serve.store import Store


def _job(store, owner):
    job = store.add_job(owner, model="m", training_file="file-x", seed=1, method={"type": "supervised"})
    store.update_job(job["id"], status="queued")
    return job["id"]


def test_queue_position_follows_the_workers_order(tmp_path):
    store = Store(tmp_path)
    first, second, third = _job(store, "a"), _job(store, "b"), _job(store, "a")
    assert [store.queue_position(j) for j in (first, second, third)] == [1, 2, 3]
    assert store.next_job()["id"] == first
    store.update_job(first, status="running")
    assert store.queue_position(first) is None  # not queued
    assert [store.queue_position(j) for j in (second, third)] == [2, 3]  # the running job is ahead
    store.update_job(second, status="paused")
    assert store.queue_position(third) == 2
    assert _with_queue(store, store.get_job(third, "a"))["queue_position"] == 2
    running = store.get_job(first, "a")
    assert "queue_position" not in _with_queue(store, running) and "queue_position" not in job_object(running)
