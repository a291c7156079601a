"""An OpenAI fine-tuning script and the distillation loop across two `tunesmith serve` processes on one PostgreSQL and
one data folder, behind a per-request round robin: the job runs once (claimed by one replica's worker), its model is
served by both (resolved by name from the store on first use), stored completions are distilled into a file and
evaluated through either, another key reaches none of it, and a model deleted through one is gone on both."""

from __future__ import annotations

import time
from contextlib import ExitStack

import httpx2 as httpx
import openai
import pytest

from .conftest import banking_rows, chat_lines
from .test_serve_replicas import RoundRobin
from .test_serve_replicas_kill import replica, wait_for

pytestmark = pytest.mark.replicas  # several servers on one PostgreSQL: make test-replicas runs them

KEYS = ("owner-key", "stranger-key")


def test_a_fine_tuning_script_and_its_model_across_two_replicas(tiny_model_dir, tmp_path, postgres):
    database, data_dir, model = postgres(), tmp_path / "shared", str(tiny_model_dir)
    with ExitStack() as stack:
        urls = [stack.enter_context(replica(tiny_model_dir, data_dir, database, tmp_path / f"r{i}.log", KEYS))[0]
                for i in range(2)]
        balancer = RoundRobin(urls)

        def client(key):
            return openai.OpenAI(base_url=urls[0], api_key=key, max_retries=0, timeout=120,
                                 http_client=httpx.Client(transport=balancer))

        a, b = client(KEYS[0]), client(KEYS[1])
        training = a.files.create(file=("t.jsonl", chat_lines(banking_rows(["card_arrival", "pin_blocked"], 8))),
                                  purpose="fine-tune")
        job = a.fine_tuning.jobs.create(model=model, training_file=training.id, suffix="replicas", method={
            "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}})
        wait_for(lambda: a.fine_tuning.jobs.retrieve(job.id).status in ("succeeded", "failed", "cancelled"), 400,
                 "the job's end")
        done = a.fine_tuning.jobs.retrieve(job.id)
        assert done.status == "succeeded", done.error
        steps = [e.message.split(":")[0] for e in a.fine_tuning.jobs.list_events(job.id, limit=1000).data
                 if e.message.startswith("Step ")]
        assert steps and len(steps) == len(set(steps)), steps  # one replica's worker ran it: each step once
        tuned = done.fine_tuned_model

        # the fine-tune is listed and answered by both replicas, each loading it by name at its first request
        for _ in range(2):
            assert tuned in [m.id for m in a.models.list()]
        seen = len(balancer.seen)
        for _ in range(2):
            reply = a.chat.completions.create(model=tuned, messages=[{"role": "user", "content": "my card?"}],
                                              max_tokens=4)
            assert reply.model == tuned
        assert set(balancer.seen[seen:]) == {httpx.URL(u).port for u in urls}

        # stored answers: distilled into a fine-tuning file and evaluated, each step through either replica
        kept = 0
        for i in range(24):  # stops: the random model's answers end; the non-empty ones are tagged for the loop
            if kept == 4:
                break
            c = a.chat.completions.create(model=model, messages=[{"role": "user", "content": f"where is card {i}?"}],
                                          max_tokens=32, stop=[" ", "e", "a", "o"], store=True,
                                          metadata={"loop": "raw"})
            if c.choices[0].message.content and kept < 4:
                a.chat.completions.update(c.id, metadata={"loop": "replicas"})
                kept += 1
        assert kept == 4
        made = a.post("/files/from_stored_completions", body={"metadata": {"loop": "replicas"}}, cast_to=object)
        assert made["examples"] == 4, made
        ev = a.evals.create(name="stored", data_source_config={"type": "stored_completions",
                                                                "metadata": {"loop": "replicas"}},
                            testing_criteria=[{"type": "string_check", "name": "answered", "operation": "ne",
                                               "input": "{{sample.output_text}}", "reference": ""}])
        run = a.evals.runs.create(ev.id, data_source={"type": "jsonl", "source": {
            "type": "stored_completions", "metadata": {"loop": "replicas"}}})
        wait_for(lambda: a.evals.runs.retrieve(run.id, eval_id=ev.id).status not in ("queued", "in_progress"), 120,
                 "the eval run's end")
        run = a.evals.runs.retrieve(run.id, eval_id=ev.id)
        assert run.status == "completed" and run.result_counts.total == 4, run

        # another key: nothing of it, on either replica
        for _ in range(2):
            with pytest.raises(openai.NotFoundError):
                b.models.retrieve(tuned)
            with pytest.raises(openai.NotFoundError):
                b.chat.completions.create(model=tuned, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            with pytest.raises(openai.NotFoundError):
                b.models.delete(tuned)
            with pytest.raises(openai.NotFoundError):
                b.fine_tuning.jobs.retrieve(job.id)
            with pytest.raises(openai.NotFoundError):
                b.files.retrieve(made["id"])
            assert tuned not in [m.id for m in b.models.list()]

        # deleted through one replica: gone on both, at their next request
        assert a.models.delete(tuned).deleted
        time.sleep(0.1)
        for _ in range(2):
            with pytest.raises(openai.NotFoundError):
                a.chat.completions.create(model=tuned, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            assert tuned not in [m.id for m in a.models.list()]
            assert a.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=2).choices


def test_replicas_sharing_a_data_folder_keep_their_vllm_apart(tmp_path, monkeypatch):
    """`tunesmith serve --database …` names the replica host-port: its vLLM's log and the endpoint its jobs worker
    reads live in a folder of its own, never another replica's (one server on SQLite keeps `<data-dir>/vllm`)."""
    import socket

    from typer.testing import CliRunner

    import tunesmith.serve.launch as launch
    from tunesmith.cli import app
    from tunesmith.serve.app import ServeSettings

    seen = []
    monkeypatch.setattr(launch, "serve_platform", lambda settings, *a, **k: seen.append(settings))
    monkeypatch.setattr(launch, "pick_engine", lambda engine, python: "vllm")
    for port, database in ((8001, "postgresql://db/x"), (8002, "postgresql://db/x"), (8003, None)):
        args = ["serve", "--model", str(tmp_path), "--data-dir", str(tmp_path / "shared"), "--port", str(port)]
        result = CliRunner().invoke(app, args + (["--database", database] if database else []))
        assert result.exit_code == 0, result.output
    host = socket.gethostname()
    assert [s.vllm_dir for s in seen] == [tmp_path / "shared" / "vllm" / f"{host}-8001",
                                          tmp_path / "shared" / "vllm" / f"{host}-8002", tmp_path / "shared" / "vllm"]
    assert ServeSettings(data_dir=tmp_path).vllm_dir == tmp_path / "vllm"
