"""The generation engine ``auto`` picks, by the device's measurement (machine/engine_measured.json): pure rules,
the record as shipped, and where generation goes in a block and in a job (no vLLM needed)."""

import json

import pytest

from tunesmith.generation import remote
from tunesmith.machine import engines


def measured(builtin_s: float, vllm_s: float, **extra) -> dict:
    return {"builtin_s": builtin_s, "vllm_s": vllm_s, "model": "m", "metrics_identical": True} | extra


@pytest.fixture()
def record_at(tmp_path, monkeypatch):
    """Point the engines' records at a file of this test's; returns a function filing a measurement there."""
    path = tmp_path / "engine_measured.json"
    monkeypatch.setattr(engines, "RECORDS", path)

    def file(workload: str, builtin_s: float, vllm_s: float, device: str = "cpu", **extra) -> dict:
        return engines.write(device, workload, measured(builtin_s, vllm_s, **extra))
    return file


def test_no_record_keeps_the_builtin_engine_and_says_how_to_measure(record_at):
    choice = engines.choose("eval", "cpu", vllm_available=True)
    assert choice.engine == "builtin"
    assert "no measurement" in choice.reason and "generation_engines.py eval --record" in choice.reason
    rollouts = engines.choose("rollouts", "NVIDIA H100 80GB HBM3", vllm_available=True)
    assert rollouts.engine == "builtin" and "generation_engines.py reinforcement --record" in rollouts.reason


def test_the_faster_engine_is_picked_where_it_can_run(record_at):
    record_at("eval", 200.0, 600.0)
    record_at("reinforcement", 300.0, 100.0)
    slower = engines.choose("eval", "cpu", vllm_available=True)
    assert slower.engine == "builtin" and "3.00x the built-in engine's time" in slower.reason
    assert engines.choose("synth", "cpu", vllm_available=True).engine == "builtin"  # synth goes by the evaluation
    assert engines.choose("rollouts", "cpu", vllm_available=True).engine == "vllm"
    absent = engines.choose("rollouts", "cpu", vllm_available=False)
    assert absent.engine == "builtin" and "vLLM cannot run here" in absent.reason
    assert engines.choose("rollouts", "NVIDIA H200", vllm_available=True).engine == "builtin"  # another device


def test_a_record_not_written_by_the_measurement_or_not_like_for_like_cannot_decide(record_at, tmp_path):
    doc = {"cpu": {"reinforcement": measured(300.0, 100.0) | {"written_by": "by hand"}}}
    engines.RECORDS.write_text(json.dumps(doc))
    choice = engines.choose("rollouts", "cpu", vllm_available=True)
    assert choice.engine == "builtin" and "not written by the measurement" in choice.reason
    record_at("eval", 300.0, 100.0, metrics_identical=False)
    choice = engines.choose("eval", "cpu", vllm_available=True)
    assert choice.engine == "builtin" and "scores were not identical" in choice.reason
    record_at("eval", 300.0, 0.0)
    assert "lacks a wall time" in engines.choose("eval", "cpu", vllm_available=True).reason
    with pytest.raises(ValueError, match="workload is one of"):
        engines.write("cpu", "serving", measured(1.0, 2.0))


def test_the_shipped_cpu_record_is_the_measurements_own_and_keeps_the_builtin_engine():
    """What this repository ships for CPUs: written by the benchmark, both uses measured, and vLLM slower."""
    cpu = engines.records()["cpu"]
    for workload in ("eval", "reinforcement"):
        assert engines.verdict(cpu[workload]) is None, workload
        assert cpu[workload]["vllm_s"] > cpu[workload]["builtin_s"]
    for use in ("eval", "synth", "rollouts"):
        assert engines.choose(use, "cpu", vllm_available=True).engine == "builtin"


class Offered(remote.CompletionsServer):
    def __init__(self):
        super().__init__("http://offered.invalid")


def test_auto_generates_on_an_offered_engine_only_where_vllm_measured_faster(record_at, monkeypatch):
    said = []
    server = Offered()
    with remote.offering(server):
        with remote.using(spec="auto", use="eval", device="cpu", say=said.append):
            assert remote.active() is None  # no record: this process
        assert "no measurement" in said[-1]
        record_at("eval", 300.0, 100.0)
        with remote.using(spec="auto", use="eval", device="cpu", say=said.append):
            assert remote.active() is server  # the running one, not a second vLLM started
        assert said[-1].startswith("eval generates on the vllm engine: vLLM took 0.33x")
        with remote.using(spec="builtin", use="eval", device="cpu"):
            assert remote.active() is None  # asked for by name
        assert remote.engine_for("eval", "cpu") is server and remote.engine_for("rollouts", "cpu") is None
    assert remote.engine_for("eval", "cpu") is None  # nothing offered outside the block
    with remote.using(server), remote.using(spec="auto", use="eval", device="cpu"):
        assert remote.active() is server  # an engine in use is kept


def test_a_jobs_engine_setting_decides_whether_the_servers_vllm_is_used_or_offered(tmp_path):
    from tunesmith.serve.jobs.worker import engine_of

    endpoint = tmp_path / "endpoint.json"
    endpoint.write_text(json.dumps({"socket": str(tmp_path / "api.sock"), "key": "k"}))
    with engine_of(endpoint, "vllm"):
        assert remote.active() is not None and remote.active().locate() == (str(tmp_path / "api.sock"), "k")
    with engine_of(endpoint, "auto"):
        assert remote.active() is None and remote.offered() is not None
    with engine_of(endpoint, "builtin"):
        assert remote.active() is None and remote.offered() is None
    with engine_of(None, "vllm"):
        assert remote.active() is None and remote.offered() is None


def test_rollouts_auto_follow_the_reinforcement_measurement(record_at, tmp_path):
    from tunesmith.train.grpo import rollout_server, rollouts_on_vllm

    from .test_train_grpo import _recipe

    auto, engine, vllm = (_recipe(tmp_path, grpo={"rollouts": r}) for r in ("auto", "engine", "vllm"))
    said = []
    server = Offered()
    with remote.offering(server):
        assert not rollouts_on_vllm(auto, "cpu", said.append) and "no measurement" in said[-1]
        record_at("reinforcement", 350.0, 1275.0)
        assert not rollouts_on_vllm(auto, "cpu", said.append) and "3.64x" in said[-1]
        assert rollout_server(auto, False) is None
        record_at("reinforcement", 300.0, 100.0)
        assert rollouts_on_vllm(auto, "cpu", said.append) and said[-1].startswith("rollouts sample on vLLM")
        assert rollout_server(auto, True) is server
        assert not rollouts_on_vllm(engine, "cpu") and rollouts_on_vllm(vllm, "cpu")
    assert not rollouts_on_vllm(auto, "cpu")  # measured faster, but nothing to run it on (a CPU, no server)
    with remote.using(server):
        assert rollouts_on_vllm(auto, "cpu")  # a job told to generate on the server's vLLM


def test_engine_settings_take_auto_and_default_to_it():
    from tunesmith.config.eval import EvalSection
    from tunesmith.config.synth import SynthSection

    assert EvalSection().engine == "auto" and SynthSection.model_fields["engine"].default == "auto"
    with pytest.raises(ValueError, match="engine is auto, builtin, vllm or an http"):
        EvalSection(engine="fastest")


def test_serve_hands_its_jobs_engine_to_the_worker_which_takes_it(tmp_path, monkeypatch):
    """The command line `tunesmith serve` starts its worker with, and that worker process accepting it."""
    import subprocess
    import sys

    from tunesmith.serve.launch import start_worker
    from tunesmith.serve.store import Store

    started = []
    monkeypatch.setattr("subprocess.Popen", lambda cmd, **kw: started.append(cmd))
    start_worker(tmp_path, vllm_endpoint=tmp_path / "endpoint.json", jobs_engine="vllm")
    assert started[0][started[0].index("--jobs-engine") + 1] == "vllm"
    monkeypatch.undo()
    Store(tmp_path / "data")  # an empty queue: the worker exits at once
    done = subprocess.run([sys.executable, "-m", "tunesmith.serve.jobs.worker", "--data-dir", str(tmp_path / "data"),
                           "--once", "--vllm-endpoint", str(tmp_path / "endpoint.json"), "--jobs-engine", "builtin"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    refused = subprocess.run([sys.executable, "-m", "tunesmith.serve.jobs.worker", "--data-dir", str(tmp_path / "data"),
                              "--once", "--jobs-engine", "fastest"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--jobs-engine: invalid choice: 'fastest'" in refused.stderr
