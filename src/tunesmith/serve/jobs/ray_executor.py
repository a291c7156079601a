"""Fine-tuning jobs on a Ray cluster (``tunesmith serve --executor ray [--ray-address ADDR]``).

Each queued job becomes one Ray task that asks for the resources its recipe needs, so several jobs run
at once across the cluster. The task runs the same :func:`~tunesmith.serve.jobs.worker.run_job` as the local
worker, against the same data folder, which every node reaches at the same path (a shared file system):
events and checkpoints go straight into the store, the fine-tuned adapter lands in
``<data-dir>/runs/<job>/train/adapter`` where the server picks it up, and cancel and pause reach the
running task through the store's control flag, which the trainer reads after every step. A task whose
worker process or node dies is retried by Ray; the retry finds the job 'running' with checkpoints and
resumes from the newest one.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

from tunesmith.errors import ConfigError
from tunesmith.serve.engines.process import SHUTDOWN, StopFlag, end_worker_process, start_worker_process, stop_on_sigterm
from tunesmith.serve.jobs.store import JobStore
from tunesmith.serve.jobs.worker import READS, job_error, run_or_fail
from tunesmith.serve.store import Store, worker_id
from tunesmith.serve.store.claims import Claim, ClaimLost, Fenced
from tunesmith.serve.store.database import database_url

log = logging.getLogger("tunesmith.worker")
RETRIES = 3  # times Ray starts a job again after its worker process or node died


def ray_module():
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'tunesmith[ray]'") from None
    return ray


def job_resources(store: JobStore, job: dict, cluster: dict) -> dict:
    """What a job asks Ray for: one CPU for the data and optimizer work, one GPU where the cluster has any,
    and the memory that the training estimate gives for the job's model and method (unknown: none asked)."""
    need = {"num_cpus": 1, "num_gpus": 1 if cluster.get("GPU", 0) >= 1 else 0}
    try:
        import tunesmith.kinds  # noqa: F401 - registers the task kinds the schema checks
        import tunesmith.train  # noqa: F401 - registers the training methods (their shapes and trainers)
        from tunesmith.config import UNMEASURED_LENGTH, validate_recipe
        from tunesmith.machine.estimate import estimate_recipe

        method = {"method": "dpo"} if (job.get("method") or {}).get("type") == "dpo" else {}
        est = estimate_recipe(validate_recipe({"name": "estimate", "model": {"name": job["model"]}, "train": {
            "batch_size": 8, "max_seq_length": UNMEASURED_LENGTH, **method}}))  # as the worker trains a job
        if est.total and est.total < cluster.get("memory", 0):
            need["memory"] = int(est.total)
    except Exception:  # noqa: BLE001 - an estimate we cannot make never blocks a job
        log.info("no memory estimate for job %s", job["id"])
    return need


def run_job_task(root: str, job_id: str, holder: str, generation: int) -> str:
    """The Ray task: one job, from its start or its newest recorded checkpoint, as the attempt of the dispatcher's
    claim (``holder``, ``generation``: every write fenced by it; the dispatcher renews it); returns the job's final
    status."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    store = JobStore(Store(Path(root), database_url()))
    job = store.get_job(job_id, any_owner=True)
    if job is None or job["status"] not in ("queued", "running"):
        return job["status"] if job else "missing"
    import ray

    claim = Claim(store.db, "jobs", job_id, holder, generation, time.monotonic(), observed=True)
    node = ray.get_runtime_context().get_node_id()[:12]
    store.add_event(job_id, f"Running as a Ray task on node {node} (worker pid {os.getpid()})",
                    data={"ray_node": node, "pid": os.getpid()}, dedup_key=f"ray:{os.getpid()}")
    run_or_fail(store, job, claim=claim)
    return store.get_job(job_id, any_owner=True)["status"]


def work_on_ray(root: Path, address: str | None = None, jobs_per_key: int = 1, poll_s: float = 0.5,
                stop: StopFlag | threading.Event | None = None, init_kwargs: dict | None = None,
                log_file=None) -> None:
    """Hand queued jobs to Ray as tasks until ``stop`` is set, never more than ``jobs_per_key`` running jobs
    of one key; jobs start in the store's fair order. A job left 'running' by a previous server resumes."""

    ray = ray_module()
    stop = stop or SHUTDOWN
    store = JobStore(Store(root, database_url()))
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **(init_kwargs or {}))
    if threading.current_thread() is threading.main_thread():  # ray.init replaced our SIGTERM handler
        stop_on_sigterm(stop, log_file or sys.stderr)
    try:
        _hand_out(ray, store, jobs_per_key, poll_s, stop)
    finally:
        if started:  # a local instance we started goes with us; running jobs resume from their checkpoints
            ray.shutdown()


def _hand_out(ray, store: JobStore, jobs_per_key: int, poll_s: float, stop) -> None:
    """Claim jobs in the store (as the jobs worker does: on PostgreSQL every replica's dispatcher takes from one
    queue, never the same job twice) and hand each to Ray; the claims of the jobs Ray runs are renewed by this
    process's heartbeat and let go when their tasks end, so that a dead dispatcher's jobs are claimed again by a live
    one (the task's writes are fenced by its claim: a task whose claim was taken over writes nothing more)."""
    task = ray.remote(max_retries=RETRIES, retry_exceptions=False)(run_job_task)
    me, running = worker_id(), {}  # running: object ref -> the job's claim
    while not stop.is_set():
        done, _ = ray.wait(list(running), num_returns=len(running), timeout=0) if running else ([], [])
        for ref in done:
            claim = running.pop(ref)
            job_id = claim.oid
            try:
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - retries used up (worker or node died again and again)
                fenced = Fenced(store, claim, READS)
                try:
                    job = fenced.get_job(job_id, any_owner=True)
                    error = job_error(exc, fenced, job)
                    fenced.update_job(job_id, status="failed", finished_at=int(time.time()), control=None, error=error)
                    fenced.add_event(job_id, f"Fine-tuning job failed: {error['message'][:500]}", level="error",
                                     dedup_key="failed")
                except ClaimLost:
                    log.warning("job %s: its claim was lost; its next attempt goes on", job_id)
            store.claims.let_go(claim)
        try:
            claimed = store.claim_job(me, jobs_per_key)  # never sole: the jobs Ray runs are this dispatcher's claims
        except Exception as exc:  # noqa: BLE001 - the store away for a moment: looked at again, never the end
            log.warning("claiming a job failed (%s); trying again", exc)
            stop.wait(max(poll_s, 2.0))
            continue
        if claimed is not None:
            job, claim = claimed
            need = job_resources(store, job, ray.cluster_resources())
            running[task.options(**need).remote(str(store.root), job["id"], me, claim.generation)] = claim
            log.info("job %s submitted to Ray with %s", job["id"], need)
            continue
        stop.wait(poll_s)


def main() -> None:
    args, log_file = start_worker_process("tunesmith fine-tuning jobs on a Ray cluster: each job a Ray task", ray=True)
    work_on_ray(args.data_dir, args.ray_address, jobs_per_key=args.jobs_per_key, log_file=log_file)
    end_worker_process()


if __name__ == "__main__":
    main()
