"""Two `--executor ray` dispatchers on one store (two replicas' workers on PostgreSQL, or a restarted one on SQLite)
hand each queued job to Ray once: they claim jobs as the jobs worker does. Ray is faked at its seam (``remote``,
``wait``, ``get``): what is checked is which jobs each dispatcher submits."""

from __future__ import annotations

import threading
import time

from tunesmith.serve.jobs.ray_executor import _hand_out
from tunesmith.serve.jobs.store import JobStore
from tunesmith.serve.store import Store

from .conftest import queued_jobs


class FakeRay:
    """Submitted tasks never end while the test runs (a long job), so a job seen twice was dispatched twice."""

    def __init__(self, submitted: list[str]):
        self.submitted = submitted

    def remote(self, **_):
        outer = self

        class Task:
            def options(self, **_):
                return self

            def remote(self, root, job_id, holder, generation):
                outer.submitted.append(job_id)
                return object()

        return lambda fn: Task()

    def wait(self, refs, num_returns, timeout):
        return [], refs

    def cluster_resources(self):
        return {"CPU": 16.0}


def test_two_dispatchers_hand_each_job_to_ray_once(store, monkeypatch):
    import tunesmith.serve.jobs.ray_executor as ray_executor

    monkeypatch.setattr(ray_executor, "job_resources", lambda store, job, cluster: {"num_cpus": 1})
    url = getattr(store.db, "url", None)  # the same database (PostgreSQL) or data folder (SQLite) for each dispatcher
    queued_jobs(store, [f"o{i}" for i in range(6)])
    submitted: list[str] = []
    stop = threading.Event()
    dispatchers = [threading.Thread(target=_hand_out, args=(FakeRay(submitted), JobStore(Store(store.root, url)),
                                                            1, 0.05, stop)) for _ in range(2)]
    for d in dispatchers:
        d.start()
    deadline = time.time() + 30
    while len(submitted) < 6 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # a second hand-out of any job would come now
    stop.set()
    for d in dispatchers:
        d.join(10)
    assert sorted(submitted) == sorted(set(submitted)) and len(submitted) == 6, submitted
