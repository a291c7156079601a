"""Synthetic items feed training directly: synth (dummy endpoint) → accepted.jsonl → tunesmith train."""

import json

from .chat_server import DummyChatServer
from .conftest import write_jsonl, write_recipe


def test_synth_output_trains_with_tunesmith_train(cli, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "q.jsonl", [{"question": f"How do I do task {i}?", "answer": f"Step {i}."}
                                              for i in range(12)])

    def reply(messages):
        q = messages[-1]["content"].split("Question: ")[1].split("\n")[0]
        task = q.split()[-1].rstrip("?")  # rewordings that do not copy the original question
        return json.dumps({"paraphrases": [f"Could you tell me the steps for task {task}?",
                                           f"Please explain what task {task} involves."]})

    with DummyChatServer(reply) as server:
        synth = write_recipe(tmp_path / "synth.yaml", {"name": "grow", "output_dir": str(tmp_path / "runs"), "synth": {
            "task": "paraphrase", "input": str(data), "paraphrase": {"n": 2},
            "provider": {"kind": "openai", "base_url": server.base_url, "model": "m", "api_key_env": None}}})
        code, out = cli(["synth", str(synth)])
    assert code == 0, out
    accepted = tmp_path / "runs" / "grow" / "synth" / "accepted.jsonl"
    assert sum(1 for _ in open(accepted)) == 24
    train = write_recipe(tmp_path / "train.yaml", {
        "name": "sft", "output_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_model_dir)},
        "data": {"path": str(accepted), "task": "generation", "input_fields": ["question"], "target_field": "answer",
                 "prompt": "{question}", "split": {"train": 20, "val": 2, "test": 2}},
        "train": {"max_steps": 4, "batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1}})
    code, out = cli(["train", str(train)])
    assert code == 0, out
    assert (tmp_path / "runs" / "sft" / "train" / "adapter" / "adapter_model.safetensors").is_file()
