"""A replica frozen, then killed with SIGKILL, mid-batch, mid-job and mid-upload: the other replica on the same PostgreSQL and data
folder finishes all three, nothing lost or done twice. Real `tunesmith serve` processes, the official client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest

from tunesmith.serve.jobs.store import JobStore
from tunesmith.serve.store import LEASE_S, Store
from tunesmith.serve.store.keys import owner_id, server_secret

from .conftest import banking_rows, chat_lines, wait_serving
from .test_serve_hostile import _free_port

pytestmark = pytest.mark.replicas  # several servers on one PostgreSQL: make test-replicas runs them

KEY = "replica-key"


@contextmanager
def replica(model: Path, data_dir: Path, database: str, log: Path, keys: tuple[str, ...] = (KEY,), *more: str):
    """`tunesmith serve` on ``database`` in a process group of its own; yields (its /v1 URL, its process)."""
    port = _free_port()
    exe = Path(sys.executable).with_name("tunesmith")
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(exe), "serve", "--model", str(model), "--data-dir", str(data_dir), "--port",
                                 str(port), "--engine", "builtin", "--batch-concurrency", "1", *more], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "TUNESMITH_API_KEYS": ",".join(keys),
                                     "TUNESMITH_DATABASE": database})
        url = f"http://127.0.0.1:{port}/v1"
        try:
            wait_serving(url, keys[0], proc, log)
            yield url, proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_a_replica_killed_mid_work_loses_nothing(tiny_model_dir, tmp_path, postgres):
    database, data_dir = postgres(), tmp_path / "shared"
    model = str(tiny_model_dir)
    with replica(tiny_model_dir, data_dir, database, tmp_path / "r1.log") as (url1, proc1):
        one = openai.OpenAI(base_url=url1, api_key=KEY, max_retries=0, timeout=60)
        training = one.files.create(file=("t.jsonl", chat_lines(banking_rows(["card_arrival", "lost_or_stolen_card"],
                                                                                12)[:24])), purpose="fine-tune")
        job = one.fine_tuning.jobs.create(model=model, training_file=training.id, method={
            "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}}})
        content = chat_lines(banking_rows(["card_arrival"], 12)[:8])
        upload = one.uploads.create(filename="u.jsonl", purpose="fine-tune", bytes=len(content),
                                    mime_type="text/jsonl")
        first = one.uploads.parts.create(upload.id, data=content[:100])

        store = JobStore(Store(data_dir, database))
        owner = owner_id(server_secret(data_dir), KEY)
        wait_for(lambda: any(e["type"] == "metrics" for e in store.events(job.id)), 180, "the job's first step")
        # the batch and the eval run start once the job runs (its worker's start takes long under load): all three
        # are mid-work when the replica is frozen
        lines = "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
            "model": model, "messages": [{"role": "user", "content": f"card question {i}"}], "max_tokens": 64,
            "temperature": 0}}) + "\n" for i in range(40))
        batch = one.batches.create(input_file_id=one.files.create(file=("b.jsonl", lines.encode()),
                                                                  purpose="batch").id,
                                   endpoint="/v1/chat/completions", completion_window="24h")
        wait_for(lambda: one.batches.retrieve(batch.id).request_counts.completed >= 1, 120, "the batch's first line")
        ev = one.evals.create(name="kill", data_source_config={"type": "custom", "item_schema": {
            "type": "object", "properties": {"q": {"type": "string"}}}, "include_sample_schema": True},
            testing_criteria=[{"type": "string_check", "name": "answered", "input": "{{sample.output_text}}",
                               "reference": "\u0000", "operation": "ne"}])
        run = one.evals.runs.create(ev.id, data_source={
            "type": "completions", "model": model, "sampling_params": {"max_completion_tokens": 32},
            "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{item.q}}"}]},
            "source": {"type": "file_content", "content": [{"item": {"q": f"card {i}"}} for i in range(60)]}})
        os.killpg(proc1.pid, signal.SIGSTOP)  # frozen mid-work (server and worker) while replica two starts
        stopped_at = time.time()
        with replica(tiny_model_dir, data_dir, database, tmp_path / "r2.log") as (url2, _):
            two = openai.OpenAI(base_url=url2, api_key=KEY, max_retries=0, timeout=60)
            assert two.batches.retrieve(batch.id).status == "in_progress"  # still mid-batch when killed
            assert two.fine_tuning.jobs.retrieve(job.id).status == "running"  # still mid-job
            assert two.evals.runs.retrieve(run.id, eval_id=ev.id).status in ("queued", "in_progress")  # mid-run
            holders = {store.get_job(job.id, owner)["claimed_by"],  # the job's, and the batch's chunk's
                       store.db.execute("SELECT claimed_by FROM batch_chunks WHERE batch_id = ?", (batch.id,)).fetchone()[0]}
            assert all(h and f":{proc1.pid}:" in h or _worker_of(h, proc1.pid) for h in holders), holders
            os.killpg(proc1.pid, signal.SIGKILL)
            proc1.wait()

            second = two.uploads.parts.create(upload.id, data=content[100:])
            done = two.uploads.complete(upload.id, part_ids=[first.id, second.id])
            assert two.files.content(done.file.id).read() == content

            wait_for(lambda: two.batches.retrieve(batch.id).status == "completed", LEASE_S + 240, "the batch's end")
            finished = two.batches.retrieve(batch.id)
            assert finished.request_counts.completed == 40 and finished.request_counts.failed == 0, finished
            ids = Counter(json.loads(line)["custom_id"] for line in
                          two.files.content(finished.output_file_id).read().splitlines())
            assert sorted(ids) == sorted(f"r{i}" for i in range(40)) and set(ids.values()) == {1}  # each line once

            wait_for(lambda: two.evals.runs.retrieve(run.id, eval_id=ev.id).status not in ("queued", "in_progress"),
                     LEASE_S + 240, "the eval run's end")
            ended_run = two.evals.runs.retrieve(run.id, eval_id=ev.id)
            assert ended_run.status == "completed" and ended_run.result_counts.total == 60, ended_run
            indexes, after = [], None
            while True:
                page = two.evals.runs.output_items.list(run.id, eval_id=ev.id, limit=100, after=after)
                indexes += [i.datasource_item_id for i in page.data]
                if not page.has_more:
                    break
                after = page.data[-1].id
            assert sorted(indexes) == list(range(60)), indexes  # every row graded once

            wait_for(lambda: two.fine_tuning.jobs.retrieve(job.id).status in ("succeeded", "failed"), LEASE_S + 400,
                     "the job's end")
            ended = two.fine_tuning.jobs.retrieve(job.id)
            assert ended.status == "succeeded", ended.error
            events = store.events(job.id)
            steps = Counter(e["data"]["step"] for e in events if e["type"] == "metrics")
            assert set(steps.values()) == {1}, steps  # every step reported once
            assert any("resumed" in e["message"] or "restarted" in e["message"] for e in events)
            # taken over only once the dead replica's lease ran out: its last renewal came at most a third of a lease
            # before it was frozen
            resumed = [e for e in events if "resumed" in e["message"] or "restarted" in e["message"]]
            assert min(e["created_at"] for e in resumed) >= stopped_at + LEASE_S * 2 / 3 - 1, (stopped_at, resumed)
            assert two.chat.completions.create(model=ended.fine_tuned_model, messages=[
                {"role": "user", "content": "my card"}], max_tokens=4).choices[0].message is not None
        store.db.close()


def _worker_of(holder: str | None, server_pid: int) -> bool:
    """Whether ``holder`` (host:pid:…) is a process whose parent is ``server_pid`` (the server's jobs worker)."""
    if not holder:
        return False
    pid = holder.split(":")[1]
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return int(stat.rsplit(")", 1)[1].split()[1]) == server_pid
