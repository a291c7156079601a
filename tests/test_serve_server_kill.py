"""SIGKILL `tunesmith serve` itself mid-job: its worker dies with it, and after a restart the job
resumes from its last checkpoint and finishes, every step's metrics event present exactly once."""

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import openai

from .conftest import http_get
from .test_serve_jobs import chat_jsonl


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model: Path, data_dir: Path, port: int, log) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("tunesmith")
    proc = subprocess.Popen([str(exe), "serve", "--model", str(model), "--data-dir", str(data_dir), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TUNESMITH_API_KEYS": "k"})
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if http_get(f"http://127.0.0.1:{port}/v1/models", "k", timeout=5)[0] == 200:
                return proc
        except OSError:  # not listening yet
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not come up within 120 s")


def _worker_pids(data_dir: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"tunesmith.serve.jobs.worker --data-dir {data_dir}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_server_killed_mid_job_resumes_after_restart(tmp_path, tiny_model_dir):
    data_dir, port = tmp_path / "data", _free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - shared by both server processes
    server = _start(tiny_model_dir, data_dir, port, log)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        f = c.files.create(file=("train.jsonl", chat_jsonl(32)), purpose="fine-tune")
        job = c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f.id, seed=5, method={
            "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 4}}})
        deadline = time.time() + 180
        while time.time() < deadline and not c.fine_tuning.jobs.checkpoints.list(job.id).data:
            time.sleep(0.1)
        assert c.fine_tuning.jobs.checkpoints.list(job.id).data, "no checkpoint before the deadline"
        assert _worker_pids(data_dir), "the server started no worker"
        server.send_signal(signal.SIGKILL)
        server.wait()
        deadline = time.time() + 20
        while time.time() < deadline and _worker_pids(data_dir):
            time.sleep(0.1)
        worker_log = (data_dir / "worker.log").read_text()
        assert not _worker_pids(data_dir), "the worker outlived its killed server:\n" + worker_log[-3000:]
        server = _start(tiny_model_dir, data_dir, port, log)
        deadline = time.time() + 300
        while time.time() < deadline and c.fine_tuning.jobs.retrieve(job.id).status not in ("succeeded", "failed"):
            time.sleep(0.5)
        final = c.fine_tuning.jobs.retrieve(job.id)
        assert final.status == "succeeded", final.error
        events = c.fine_tuning.jobs.list_events(job.id, limit=1000).data
        steps = [e.data["step"] for e in events if e.type == "metrics" and "train_loss" in (e.data or {})]
        assert sorted(steps) == list(range(1, 3 * 8 + 1)), steps  # 32 examples, batch 4, 3 epochs
        assert max(Counter(steps).values()) == 1
        assert any("resumed from its checkpoint at step" in e.message for e in events)
        assert final.fine_tuned_model in [m.id for m in c.models.list().data]
    finally:
        server.kill()
        server.wait()
        log.close()


def test_a_batch_stopped_by_sigterm_loses_no_line(tmp_path, tiny_model_dir):
    """SIGTERM mid-batch: the lines the stop cuts short (503 from the closing engine) are not recorded as failed;
    after the restart the batch ends with every line answered once, none failed."""
    import json

    data_dir, port = tmp_path / "data", _free_port()
    url = f"http://127.0.0.1:{port}/v1"
    with open(tmp_path / "server.log", "ab") as log:
        proc = _start(tiny_model_dir, data_dir, port, log)
        c = openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=60)
        lines = "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
            "model": str(tiny_model_dir), "messages": [{"role": "user", "content": f"card {i}"}], "max_tokens": 48}})
            + "\n" for i in range(160))
        f = c.files.create(file=("b.jsonl", lines.encode()), purpose="batch")
        batch = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        deadline = time.time() + 120
        while c.batches.retrieve(batch.id).request_counts.completed < 10:
            assert time.time() < deadline, "the batch did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        proc = _start(tiny_model_dir, data_dir, port, log)
        try:
            deadline = time.time() + 300
            while (b := c.batches.retrieve(batch.id)).status not in ("completed", "failed", "expired", "cancelled"):
                assert time.time() < deadline, b
                time.sleep(0.3)
            assert b.status == "completed" and (b.request_counts.completed, b.request_counts.failed) == (160, 0), b
            ids = Counter(json.loads(x)["custom_id"] for x in c.files.content(b.output_file_id).read().splitlines())
            assert set(ids.values()) == {1} and len(ids) == 160
        finally:
            proc.terminate()
            proc.wait(60)
