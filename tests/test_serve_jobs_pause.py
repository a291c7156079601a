"""Pause a running job, resume it, and see it finish from where it stopped."""

import threading
import time

import openai

from tunesmith.serve.jobs.worker import work

from .test_serve_jobs import chat_jsonl, live  # noqa: F401  (the live-server fixture)


def test_pause_then_resume_finishes_the_job(live):  # noqa: F811
    c = openai.OpenAI(base_url=live["url"], api_key="k1", max_retries=0)
    f = c.files.create(file=("p.jsonl", chat_jsonl(24)), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model=live["base"], training_file=f.id, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 4, "batch_size": 4}}})
    worker = threading.Thread(target=work, args=(live["data_dir"],), kwargs={"once": True}, daemon=True)
    worker.start()
    deadline = time.time() + 120
    while time.time() < deadline and not [e for e in c.fine_tuning.jobs.list_events(job.id, limit=100).data
                                          if e.type == "metrics"]:
        time.sleep(0.1)
    assert c.fine_tuning.jobs.pause(job.id).id == job.id
    worker.join(120)
    paused = c.fine_tuning.jobs.retrieve(job.id)
    assert paused.status == "paused"
    assert c.fine_tuning.jobs.resume(job.id).status == "queued"
    work(live["data_dir"], once=True)
    done = c.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded", done.error
    steps = sorted(e.data["step"] for e in c.fine_tuning.jobs.list_events(job.id, limit=1000).data
                   if e.type == "metrics" and "train_loss" in (e.data or {}))
    assert steps == list(range(1, 4 * 6 + 1))  # every step once, none lost across the pause
    messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=1000).data]
    assert "Job paused" in messages and any("resumed" in m for m in messages)
