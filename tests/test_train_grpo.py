"""GRPO: rewards from the task kind and from graders, a recipe arm that continues an SFT arm with GRPO and is
scored by `tunesmith run`, and full fine-tuning against a reference model."""

import csv
import json

import pytest

from tunesmith.config import validate_recipe
from tunesmith.errors import ConfigError
from tunesmith.records import Example
from tunesmith.train.grpo import recipe_rows, reward_functions

from .conftest import banking_recipe, banking_rows, write_jsonl, write_recipe

LABELS = ("card_arrival", "pin_blocked", "age_limit")
GRADER = {"type": "string_check", "name": "intent", "input": "{{sample.output_text}}",
          "reference": "{{item.category}}", "operation": "eq"}
FAST = {"max_steps": 2, "batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1, "max_seq_length": 96}
FUZZY = {"type": "text_similarity", "name": "close", "input": "{{sample.output_text}}", "reference": "{{item.target}}",
         "evaluation_metric": "fuzzy_match"}  # a reward that differs between a random model's completions
GRPO = {"num_generations": 2, "max_completion_length": 6, "beta": 0.04}


def _recipe(tmp_path, **train):
    doc = banking_recipe(tmp_path, "random:llama", tmp_path / "d.jsonl", name="g", seed=1, split={"val": 0},
                         train={"method": "grpo", **train})
    return validate_recipe(doc)


def test_task_and_grader_rewards_score_completions_against_the_example(tmp_path):
    examples = [Example("a", {"text": "where is my card"}, "card_arrival"),
                Example("b", {"text": "my pin is blocked"}, "pin_blocked")]
    recipe = _recipe(tmp_path, grpo={"reward": ["task", GRADER]})
    rows = recipe_rows(recipe, examples)
    assert rows[0]["prompt"][-1] == {"role": "user", "content": "where is my card"}
    assert json.loads(rows[1]["item"]) == {"text": "my pin is blocked", "target": "pin_blocked",
                                           "category": "pin_blocked"}
    task, grader = reward_functions(recipe, examples, list(LABELS))
    assert (task.__name__, grader.__name__) == ("task_accuracy", "grader_intent")
    completions = [[{"role": "assistant", "content": "card_arrival"}], [{"role": "assistant", "content": "age_limit"}],
                   [{"role": "assistant", "content": " pin_blocked\n"}], [{"role": "assistant", "content": "no idea"}]]
    columns = {"example": [0, 0, 1, 1], "item": [rows[0]["item"]] * 2 + [rows[1]["item"]] * 2}
    assert task(prompts=[None] * 4, completions=completions, **columns) == [1.0, 0.0, 1.0, 0.0]
    # string_check compares the text as it is: the padded label is not equal
    assert grader(prompts=[None] * 4, completions=completions, **columns) == [1.0, 0.0, 0.0, 0.0]


def test_bad_rewards_are_refused_naming_the_field(tmp_path):
    recipe = _recipe(tmp_path, grpo={"reward": {**GRADER, "operation": "startswith"}})
    with pytest.raises(ConfigError, match=r"train\.grpo\.reward\.0\.operation"):
        reward_functions(recipe, [Example("a", {"text": "x"}, "card_arrival")], list(LABELS))
    with pytest.raises(ConfigError, match="multiple of grpo.num_generations"):
        _recipe(tmp_path, batch_size=3, grpo={"num_generations": 2})


def test_grpo_arm_continues_the_sft_arm_and_is_scored(cli, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(LABELS, 8))
    doc = banking_recipe(tmp_path, tiny_model_dir, data, name="rl", seed=2, split={"train": 16, "val": 0, "test": 8},
                         train=FAST, eval={"max_new_tokens": 3, "baselines": ["majority"], "bootstrap": 100})
    doc["arms"] = [{"name": "sft"}, {"name": "sft-grpo", "from_arm": "sft",
                                     "train": {"method": "grpo", "grpo": {**GRPO, "reward": ["task", GRADER]}}}]
    code, out = cli(["run", str(write_recipe(tmp_path / "r.yaml", doc))])
    assert code == 0, out
    run = tmp_path / "runs" / "rl"
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"base", "sft", "sft-grpo", "majority"}
    assert metrics["sft-grpo"]["n"] == 8 and "accuracy_ci95" in metrics["sft-grpo"]
    train = run / "arms" / "sft-grpo" / "train"
    with open(train / "metrics.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [int(float(r["step"])) for r in table] == [1, 2]
    assert all(0 <= float(r["train_reward_mean"]) <= 2 and float(r["train_reward_std"]) >= 0 for r in table)
    log = json.loads((train / "grpo_log.json").read_text())
    assert {"rewards/task_accuracy/mean", "rewards/grader_intent/mean", "kl"} <= set(log[0])
    adapter = json.loads((train / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and not (train / "adapter" / "ref").exists()  # the KL reference is not saved
    summary = json.loads((train / "summary.json").read_text())
    assert summary["trainable_tensors_changed"] > 0
    report = (run / "report.md").read_text()
    assert "GRPO LoRA" in report and "mean reward first → last" in report


def test_full_fine_tune_grpo_trains_against_a_reference_model(cli, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(LABELS, 4))
    doc = banking_recipe(tmp_path, tiny_model_dir, data, name="full", seed=3, split={"train": 10, "val": 0, "test": 2},
                         train={**FAST, "adapter": "full", "learning_rate": 1e-4, "method": "grpo",
                                "grpo": {**GRPO, "reward": FUZZY}})
    code, out = cli(["train", str(write_recipe(tmp_path / "r.yaml", doc))])
    assert code == 0, out
    train = tmp_path / "runs" / "full" / "train"
    assert (train / "model" / "model.safetensors").is_file()
    assert json.loads((train / "summary.json").read_text())["trainable_tensors_changed"] > 0
    log = json.loads((train / "grpo_log.json").read_text())
    assert log[0]["reward_std"] > 0 and "kl" in log[0]
    assert "GRPO full fine-tune" in out


def test_metrics_file_has_reward_columns_only_where_there_are_rewards(tmp_path):
    from tunesmith.train.metrics import COLUMNS, EXTRA, plot_loss, read_metrics_csv, write_metrics_csv

    write_metrics_csv([{"step": 1, "train_loss": 0.5}], tmp_path / "sft.csv")
    assert (tmp_path / "sft.csv").read_text().splitlines()[0].split(",") == COLUMNS + EXTRA
    rows = [{"step": 1, "train_loss": 0.0, "train_reward_mean": 0.25, "train_reward_std": 0.1},
            {"step": 2, "train_loss": 0.0, "train_reward_mean": 0.5, "train_reward_std": 0.2}]
    write_metrics_csv(rows, tmp_path / "grpo.csv")
    back = read_metrics_csv(tmp_path / "grpo.csv")
    assert list(back[0])[-2:] == ["train_reward_mean", "train_reward_std"] and back[1]["train_reward_mean"] == 0.5
    assert plot_loss(back, tmp_path / "loss.png", "grpo").stat().st_size > 0


def test_rollouts_on_vllm_take_trls_colocate_mode_on_cuda_within_the_jobs_share(tmp_path, monkeypatch):
    """The plumbing of train.grpo.rollouts, on a simulated CUDA device (no GPU, no vllm needed)."""
    import types

    import torch

    from tunesmith.train.grpo import vllm_colocate

    assert vllm_colocate(_recipe(tmp_path, grpo={"rollouts": "auto"}), "cpu", False) == {}
    with pytest.raises(ConfigError, match="colocate mode, which needs a CUDA GPU"):
        vllm_colocate(_recipe(tmp_path, grpo={"rollouts": "vllm"}), "cpu", True)
    assert vllm_colocate(_recipe(tmp_path, grpo={"rollouts": "auto"}), "cuda", True) == {}  # vllm not installed
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object() if name == "vllm" else None)
    assert vllm_colocate(_recipe(tmp_path, grpo={"rollouts": "vllm"}), "cuda", True) == {
        "use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3}
    assert vllm_colocate(_recipe(tmp_path, grpo={"rollouts": "engine"}), "cuda", False) == {}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=80 * 2**30))
    shared = vllm_colocate(_recipe(tmp_path, memory_limit_gb=40, grpo={"rollouts": "auto"}), "cuda", True)
    assert shared["vllm_gpu_memory_utilization"] == 0.15  # 30% of the job's 40 of 80 GiB
