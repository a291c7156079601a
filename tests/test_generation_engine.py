"""Generation on an engine (``eval.engine``, ``synth.engine``, a job on `tunesmith serve --engine vllm`) with a
stand-in vLLM (tests/fake_vllm: it answers every prompt with the words "one two three ..."), started through the
real launch; what vLLM itself answers is compared with the built-in engine in tests/test_vllm_engine.py."""

import json
import os
import sys

import pytest

from tunesmith.clients.calls import ChatRequest
from tunesmith.clients.chat import LocalChatClient
from tunesmith.generation import remote
from tunesmith.graders.model import LocalBackend
from tunesmith.serve.engines.vllm.server import vllm_completions

from .conftest import REPO, banking_recipe, write_jsonl, write_recipe

FAKE = REPO / "tests" / "fake_vllm"


@pytest.fixture()
def fake_vllm(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAKE), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("TUNESMITH_VLLM_PYTHON", sys.executable)


def lora_adapter(tiny_model_dir, folder):
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.config import LoraSection
    from tunesmith.models.loading import wrap_adapter

    model = wrap_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), "lora",
                         LoraSection(r=4, alpha=8, dropout=0.0), seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


def test_eval_engine_vllm_generates_there_and_scores_the_rest_here(cli, tmp_path, tiny_model_dir, fake_vllm):
    """The base and a LoRA adapter answer on the engine (the adapter loaded there for its turn); a merged folder,
    which vLLM cannot take as an adapter, answers in this process; the parameter count is the model's own."""
    rows = [{"text": f"say hello number {i}", "answer": f"hello {i}"} for i in range(10)]
    data = write_jsonl(tmp_path / "g.jsonl", rows)
    doc = banking_recipe(tmp_path, tiny_model_dir, data, name="ev", seed=3,
                         split={"train": 4, "val": 0, "test": 6, "stratify": False},
                         data={"target_field": "answer", "task": "generation"},
                         eval={"max_new_tokens": 4, "batch_size": 4, "bootstrap": 0, "baselines": [], "engine": "vllm",
                               "adapters": [{"name": "lora", "path": str(lora_adapter(tiny_model_dir, tmp_path / "a"))},
                                            {"name": "merged", "path": str(tiny_model_dir)}]})
    code, out = cli(["eval", str(write_recipe(tmp_path / "r.yaml", doc))])
    assert code == 0, out
    ev = tmp_path / "runs" / "ev" / "eval"
    outputs = {}
    for line in (ev / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        outputs.setdefault(row["model"], set()).add(row["output"])
    assert outputs["base"] == outputs["lora"] == {"one two three four"}
    assert outputs["merged"] != {"one two three four"}  # generated here, by the model itself
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["base"]["parameters"] == metrics["merged"]["parameters"] > 0
    assert "tunesmith starts vLLM" in (ev / "engine" / "vllm.log").read_text()


@pytest.mark.parametrize("vllm_s", [100.0, 600.0])
def test_eval_engine_auto_generates_where_this_devices_measurement_says(cli, tmp_path, tiny_model_dir, fake_vllm,
                                                                      monkeypatch, vllm_s):
    """``eval.engine: auto`` reads the device's record: vLLM where it was measured faster (the stand-in's words),
    else this process; the choice and its reason are printed."""
    from tunesmith.machine import engines

    monkeypatch.setattr(engines, "RECORDS", tmp_path / "engine_measured.json")
    engines.write("cpu", "eval", {"builtin_s": 200.0, "vllm_s": vllm_s, "metrics_identical": True, "model": "tiny"})
    rows = [{"text": f"say hello number {i}", "answer": f"hello {i}"} for i in range(6)]
    doc = banking_recipe(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "g.jsonl", rows), name="ev", seed=3,
                         split={"train": 2, "val": 0, "test": 4, "stratify": False},
                         data={"target_field": "answer", "task": "generation"}, model={"device": "cpu"},
                         eval={"max_new_tokens": 4, "batch_size": 4, "bootstrap": 0, "baselines": []})
    code, out = cli(["eval", str(write_recipe(tmp_path / "r.yaml", doc))])
    assert code == 0, out
    picked = "vllm" if vllm_s < 200.0 else "builtin"
    assert f"eval generates on the {picked} engine: vLLM took {vllm_s / 200:.2f}x" in " ".join(out.split())
    outputs = {json.loads(line)["output"] for line in (tmp_path / "runs" / "ev" / "eval" / "predictions.jsonl")
               .read_text().splitlines()}
    assert (outputs == {"one two three four"}) == (picked == "vllm")


def test_synth_and_model_graders_generate_on_the_active_engine(tmp_path, tiny_model_dir, fake_vllm):
    with vllm_completions(str(tiny_model_dir), tmp_path / "log") as server, remote.using(server):
        client = LocalChatClient(str(tiny_model_dir), engine="vllm")
        replies = {}
        schema = json.dumps({"type": "object", "properties": {"q": {"type": "string"}}})
        client.run([ChatRequest.chat([{"role": "user", "content": "hi"}], max_tokens=3),
                    ChatRequest.chat([{"role": "user", "content": "hi"}], max_tokens=3, schema=schema)],
                   lambda i, r: replies.__setitem__(i, r))
        assert replies[0].texts == ["one two three"]
        assert json.loads(replies[1].texts[0]) == {"schema": json.loads(schema)}  # decoded under it, there
        assert client.endpoint == "local@vllm"  # its calls are cached apart from the built-in engine's
        backend = LocalBackend(str(tiny_model_dir), max_tokens=2)
        assert [r.text for r in backend.chat_many("m", [[{"role": "user", "content": "x"}]], {})] == ["one two"]


def test_grpo_rollouts_sample_on_the_active_engine_with_the_policy_loaded_each_step(cli, tmp_path, tiny_model_dir,
                                                                                   fake_vllm, monkeypatch):
    """A job's GRPO on `tunesmith serve --engine vllm`: completions come from the server, the policy's adapter
    loaded there once per optimizer step and unloaded after; the training itself runs here."""
    from .conftest import banking_rows

    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(("card_arrival", "pin_blocked"), 5))
    doc = banking_recipe(tmp_path, tiny_model_dir, data, name="rl", seed=2, split={"train": 8, "val": 0, "test": 2},
                         train={"method": "grpo", "max_steps": 2, "batch_size": 4, "logging_steps": 1,
                                "max_seq_length": 96, "grpo": {"num_generations": 2, "max_completion_length": 4}})
    loads = []
    load = remote.CompletionsServer.load_adapter
    monkeypatch.setattr(remote.CompletionsServer, "load_adapter",
                        lambda self, path: loads.append(load(self, path)) or loads[-1])
    with vllm_completions(str(tiny_model_dir), tmp_path / "log") as server, remote.using(server):
        code, out = cli(["train", str(write_recipe(tmp_path / "r.yaml", doc))])
        assert code == 0, out
        assert len(loads) == 2 and not set(loads) & set(server.served_models())  # one per step, unloaded after
    assert (tmp_path / "runs" / "rl" / "train" / "adapter" / "adapter_config.json").is_file()
