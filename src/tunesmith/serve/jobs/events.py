"""What a running job reports beyond its steps: its integrations, its estimated finish, and the
full-validation figures of its last checkpoint."""

from __future__ import annotations

import time

from tunesmith.serve.jobs.store import JobStore


def estimated_finish(started_at: float, start_step: int, step: int, total: int) -> int | None:
    """Unix time the job should finish, from the pace of the steps run since it (re)started."""
    done = step - start_step
    if done <= 0 or total <= 0:
        return None
    return int(time.time() + (time.time() - started_at) / done * max(0, total - step))


def announce_integrations(store: JobStore, job: dict) -> None:
    """Say, once per entry, where an integration's metrics go: a Weights & Biases entry is logged to the job's
    local tracker (its run folder's train/metrics.csv, returned as the job's results file and shown live as
    metrics events), never sent to wandb.ai."""
    for i, entry in enumerate(job.get("integrations") or []):
        spec = entry.get("wandb") or {}
        run = f", run '{spec['name']}'" if spec.get("name") else ""
        store.add_event(job["id"], f"Weights & Biases integration (project '{spec.get('project')}'{run}): metrics are "
                        "logged to this job's local tracker (train/metrics.csv in its run folder, returned as the "
                        "job's results file). Nothing is sent to wandb.ai: every metric stays on this machine.",
                        data={"integration": entry, "local_tracker": "train/metrics.csv"}, dedup_key=f"integration:{i}")


def mark_full_validation(store: JobStore, job_id: str, last: dict) -> None:
    """The last checkpoint's metrics gain OpenAI's full_valid_* figures: the validation pass at the end of
    training covers the whole validation file."""
    if last.get("valid_loss") is None:
        return
    full = {"full_valid_loss": last["valid_loss"], "full_valid_mean_token_accuracy": last.get("valid_mean_token_accuracy")}
    checkpoints = store.checkpoints(job_id)
    if checkpoints:
        newest = checkpoints[0]
        same_step = newest["step_number"] == last.get("step")  # the last validation pass may log after the save
        merged = {**newest["metrics"], **(last if same_step else {}), **full}
        store.update_checkpoint_metrics(job_id, newest["step_number"], merged)
