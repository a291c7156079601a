"""Resume after SIGKILL: the resumed run ends where an uninterrupted one does; no step twice or skipped; its
training time includes the stretch before the kill."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from .conftest import banking_recipe, banking_rows, write_jsonl, write_recipe

KILL_AT = 4
STEPS = 8

# The child trains through the real CLI; the only addition is a callback that SIGKILLs the process
# right after the trainer has written the checkpoint of step KILL_AT.
CHILD = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    import tunesmith.train.sft as sft
    from tunesmith.cli import main

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == int(sys.argv[2]):
                os.kill(os.getpid(), signal.SIGKILL)

    build = sft.build_trainer
    def build_and_arm(*a, **k):
        trainer = build(*a, **k)
        trainer.add_callback(KillAfterSave())
        return trainer
    sft.build_trainer = build_and_arm
    sys.exit(main(["train", sys.argv[1]]))
""")


def _recipe(tmp_path, tiny_model_dir, name):
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(("card_arrival", "pin_blocked", "age_limit"), 10))
    # 24 examples / batch 4 = 6 steps per epoch: the kill lands mid-epoch 1, the run ends in epoch 2
    return write_recipe(tmp_path / f"{name}.yaml", banking_recipe(
        tmp_path, tiny_model_dir, data, name=name, seed=11, split={"train": 24, "val": 0, "test": 6},
        train={"max_steps": STEPS, "batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1, "save_steps": 2,
               "save_total_limit": 2, "max_seq_length": 96, "lora": {"dropout": 0.1}}))


def _steps_and_losses(run):
    state = json.loads(
        max(
            (run / "train/checkpoints").glob("checkpoint-*/trainer_state.json"),
            key=lambda p: int(p.parent.name.split("-")[1]),
        ).read_text()
    )
    logged = [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]
    return [s for s, _ in logged], [loss for _, loss in logged]


def test_resume_after_sigkill_matches_uninterrupted_run(cli, tmp_path, tiny_model_dir):
    killed = _recipe(tmp_path, tiny_model_dir, "killed")
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(killed), str(KILL_AT)], capture_output=True, text=True, timeout=240
    )
    assert child.returncode == -9, child.stdout + child.stderr
    run = tmp_path / "runs" / "killed"
    assert (run / f"train/checkpoints/checkpoint-{KILL_AT}/trainer_state.json").is_file()
    assert not (run / "train/adapter").exists()  # it really died before finishing
    state_file = run / f"train/checkpoints/checkpoint-{KILL_AT}/trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["stateful_callbacks"]["TrainingClock"]["attributes"]["seconds"] > 0
    state["stateful_callbacks"]["TrainingClock"]["attributes"]["seconds"] = 1000.0  # as if it had taken 1,000 s
    state_file.write_text(json.dumps(state))

    code, out = cli(["train", str(killed), "--resume"])
    assert code == 0, out
    assert "resumed from a checkpoint" in out
    code, out = cli(["train", str(_recipe(tmp_path, tiny_model_dir, "straight"))])
    assert code == 0, out

    steps, losses = _steps_and_losses(run)
    ref_steps, ref_losses = _steps_and_losses(tmp_path / "runs" / "straight")
    assert steps == ref_steps == list(range(1, STEPS + 1))  # each step once, none skipped
    assert losses == pytest.approx(ref_losses, rel=1e-4)  # same batches in the same order after resuming
    resumed = load_file(run / "train/adapter/adapter_model.safetensors")
    straight = load_file(tmp_path / "runs/straight/train/adapter/adapter_model.safetensors")
    assert set(resumed) == set(straight)
    for key in resumed:
        # Adam divides by sqrt(v): a gradient near zero turns thread-order float noise into a visible change
        # in a single weight, so the check is per tensor. A skipped, repeated or reordered batch moves whole
        # tensors by far more than 1e-3 of their norm.
        drift = torch.linalg.vector_norm(resumed[key] - straight[key]) / torch.linalg.vector_norm(straight[key])
        assert drift < 1e-3, (key, float(drift))
    summary = json.loads((run / "train/summary.json").read_text())
    assert summary["resumed"] is True
    assert 1000 < summary["seconds"] < 1000 + 240  # the time behind the checkpoint counts, once
    assert summary["tokens_per_second"] == pytest.approx(summary["tokens"] / summary["seconds"])


def test_resume_without_checkpoint_is_a_config_error(cli, tmp_path, tiny_model_dir):
    code, out = cli(["train", str(_recipe(tmp_path, tiny_model_dir, "fresh")), "--resume"])
    assert code == 2 and "no complete checkpoint" in out, out
