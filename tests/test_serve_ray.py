"""Fine-tuning jobs on a local Ray cluster started inside the test (no network), through the official
`openai` client: two keys' jobs run at the same time, a running job is cancelled, another is paused and
resumed, and a job whose Ray worker process is killed resumes from its checkpoint."""

import os
import signal
import threading
import time

import openai
import pytest

from tunesmith.serve.app import ServeSettings, create_app
from tunesmith.serve.engines.builtin import Engine
from tunesmith.serve.jobs.store import JobStore
from tunesmith.serve.store import Store

from .conftest import banking_rows, chat_lines, running_server

ray = pytest.importorskip("ray", reason="Ray is the optional extra tunesmith[ray]")

LABELS = ("card_arrival", "pin_blocked", "age_limit")


def chat_jsonl(n: int) -> bytes:
    return chat_lines((banking_rows(LABELS, 30) * 2)[:n], system=None)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    """The server, and the Ray executor in a thread of this process over a local 2-CPU Ray cluster."""
    from tunesmith.serve.jobs.ray_executor import work_on_ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["OMP_NUM_THREADS"] = "1"  # the Ray workers inherit it: two jobs share the two cores
    data_dir = tmp_path_factory.mktemp("ray-serve")
    settings = ServeSettings(model=str(tiny_model_dir), api_keys=frozenset({"k1", "k2"}), data_dir=data_dir)
    stop = threading.Event()
    # address "local": a Ray of its own, never one another test process started on this machine (Ray's default)
    executor = threading.Thread(target=work_on_ray, args=(data_dir, "local"), daemon=True,
                                kwargs={"stop": stop, "poll_s": 0.2, "init_kwargs": {"num_cpus": 2}})
    executor.start()
    with running_server(create_app(settings, Engine(str(tiny_model_dir), {}, wait_ms=5))) as url:
        yield {"url": url, "base": str(tiny_model_dir), "store": JobStore(Store(data_dir))}
    stop.set()
    executor.join(30)
    ray.shutdown()


def _client(cluster, key):
    return openai.OpenAI(base_url=cluster["url"], api_key=key, max_retries=0)


def _submit(cluster, key, rows, epochs=1, batch=2):
    c = _client(cluster, key)
    f = c.files.create(file=("train.jsonl", chat_jsonl(rows)), purpose="fine-tune")
    return c.fine_tuning.jobs.create(model=cluster["base"], training_file=f.id, seed=1, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": epochs, "batch_size": batch}}})


def _wait(cluster, key, job_id, until, timeout=240):
    c = _client(cluster, key)
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = c.fine_tuning.jobs.retrieve(job_id)
        if until(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"{job_id} still {job.status} after {timeout} s")


def _seqs(store, job_id, message_start):
    rows = store.db.execute("SELECT seq FROM events WHERE job_id = ? AND message LIKE ? ORDER BY seq",
                            (job_id, message_start + "%"))
    return [r[0] for r in rows]


def _steps(cluster, key, job_id):
    events = _client(cluster, key).fine_tuning.jobs.list_events(job_id, limit=1000).data[::-1]  # oldest first
    return [e.data["step"] for e in events if e.type == "metrics"], [e.message for e in events]


@pytest.mark.slow
def test_two_keys_jobs_run_at_the_same_time_and_both_succeed(cluster):
    a, b = _submit(cluster, "k1", 24), _submit(cluster, "k2", 24)
    done = [_wait(cluster, k, j.id, lambda j: j.status in ("succeeded", "failed", "cancelled"))
            for k, j in (("k1", a), ("k2", b))]
    assert [j.status for j in done] == ["succeeded", "succeeded"], [j.error for j in done]
    store = cluster["store"]
    starts = [_seqs(store, j.id, "Fine-tuning job started")[0] for j in (a, b)]
    ends = [_seqs(store, j.id, "The job has successfully completed")[0] for j in (a, b)]
    assert max(starts) < min(ends)  # each started before the other finished: the running intervals overlap
    for key, job in (("k1", a), ("k2", b)):
        steps, messages = _steps(cluster, key, job.id)
        assert steps == list(range(1, 13))  # 24 rows, batch 2: every step once, in order
        order = ["Validating training file", "Files validated", "Running as a Ray task", "Fine-tuning job started",
                 "New fine-tuned model created", "The job has successfully completed"]
        found = [next(i for i, m in enumerate(messages) if m.startswith(o)) for o in order]
        assert found == sorted(found), messages
        # the adapter landed in the shared data folder, and the server serves it to the job's key
        reply = _client(cluster, key).chat.completions.create(
            model=_client(cluster, key).fine_tuning.jobs.retrieve(job.id).fine_tuned_model,
            messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert reply.choices[0].message.content is not None


@pytest.mark.slow
def test_cancel_reaches_a_running_task_and_a_killed_worker_resumes(cluster):
    store = cluster["store"]
    victim = _submit(cluster, "k2", 60)  # 30 steps, a checkpoint every 3
    cancelled = _submit(cluster, "k1", 60)
    _wait(cluster, "k1", cancelled.id, lambda j: _steps(cluster, "k1", cancelled.id)[0][-1:] >= [2])
    assert _client(cluster, "k1").fine_tuning.jobs.cancel(cancelled.id).status == "running"  # stops within a step
    _wait(cluster, "k2", victim.id, lambda j: store.checkpoints(victim.id))
    (first,) = [e for e in store.events(victim.id) if e["message"].startswith("Running as a Ray task")]
    os.kill(first["data"]["pid"], signal.SIGKILL)  # the Ray worker process running the job
    assert _wait(cluster, "k1", cancelled.id, lambda j: j.status != "running").status == "cancelled"
    job = _wait(cluster, "k2", victim.id, lambda j: j.status in ("succeeded", "failed", "cancelled"))
    assert job.status == "succeeded", job.error
    steps, messages = _steps(cluster, "k2", victim.id)
    assert steps == list(range(1, 31))  # every step once, none repeated or lost across the kill
    assert sum(m.startswith("Running as a Ray task") for m in messages) == 2  # Ray started it again
    assert any(m.startswith("Fine-tuning job resumed from its checkpoint at step") for m in messages), messages


@pytest.mark.slow
def test_pause_reaches_a_running_task_and_resume_finishes_it(cluster):
    c = _client(cluster, "k1")
    job = _submit(cluster, "k1", 60)  # 30 steps: still running when the pause arrives
    _wait(cluster, "k1", job.id, lambda j: _steps(cluster, "k1", job.id)[0][-1:] >= [2])
    assert c.fine_tuning.jobs.pause(job.id).status == "running"  # the task stops and saves within a step
    assert _wait(cluster, "k1", job.id, lambda j: j.status != "running").status == "paused"
    paused_at = _steps(cluster, "k1", job.id)[0][-1]
    assert paused_at < 30
    assert c.fine_tuning.jobs.resume(job.id).status == "queued"
    done = _wait(cluster, "k1", job.id, lambda j: j.status in ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    steps, messages = _steps(cluster, "k1", job.id)
    assert steps == list(range(1, 31))  # every step once, none lost or repeated across the pause
    assert messages.index("Job paused") < messages.index(f"Fine-tuning job resumed from its checkpoint at step {paused_at}")
