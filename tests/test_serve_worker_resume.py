"""SIGKILL the jobs worker mid-job; a new worker resumes from the last checkpoint, and every step's
metrics event exists exactly once."""

import os
import signal
import subprocess
import sys
import time
from collections import Counter

from tunesmith.serve.jobs.store import JobStore
from tunesmith.serve.store import Store

from .test_serve_jobs import chat_jsonl


def test_worker_killed_mid_job_resumes_without_lost_or_duplicated_events(tmp_path, tiny_model_dir):
    store = JobStore(Store(tmp_path))
    f = store.add_file("k", "train.jsonl", "fine-tune", chat_jsonl(32))
    job = store.add_job("k", model=str(tiny_model_dir), training_file=f["id"], validation_file=None, suffix=None,
                        seed=5, method={"type": "supervised", "supervised": {"hyperparameters": {
                            "n_epochs": 3, "batch_size": 4}}}, metadata=None)
    store.update_job(job["id"], status="queued")
    cmd = [sys.executable, "-m", "tunesmith.serve.jobs.worker", "--data-dir", str(tmp_path), "--once"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and not store.checkpoints(job["id"]) and proc.poll() is None:
        time.sleep(0.05)
    assert store.checkpoints(job["id"]), "no checkpoint before the deadline"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert store.get_job(job["id"], "k")["status"] == "running"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    final = store.get_job(job["id"], "k")
    assert final["status"] == "succeeded", final["error"]
    steps = [e["data"]["step"] for e in store.events(job["id"]) if e["type"] == "metrics" and "train_loss" in e["data"]]
    total = 3 * 8  # 32 examples, batch 4, 3 epochs
    assert sorted(steps) == list(range(1, total + 1)), steps
    assert max(Counter(steps).values()) == 1
    messages = [e["message"] for e in store.events(job["id"])]
    assert any("resumed from its checkpoint at step" in m for m in messages)
