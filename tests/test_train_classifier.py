"""head: classifier — LoRA plus a linear head; one forward pass gives a probability per label."""

import csv
import json
from pathlib import Path

from .conftest import banking_recipe, banking_rows, write_jsonl, write_recipe

LABELS = ("card_arrival", "pin_blocked", "age_limit")


def head_recipe(tmp_path, tiny_model_dir, name: str, **train):
    """A 3-intent classifier-head recipe (27 train / 9 test messages) on the tiny model, constant learning rate."""
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(LABELS, 12))
    return write_recipe(tmp_path / "r.yaml", banking_recipe(
        tmp_path, tiny_model_dir, data, name=name, seed=4, split={"train": 27, "val": 0, "test": 9},
        train={"head": "classifier", "batch_size": 9, "max_seq_length": 64, "lr_scheduler": "constant", **train},
        eval={"baselines": ["majority"], "max_new_tokens": 4}))


def test_classifier_head_trains_and_reports_probabilities(cli, tmp_path, tiny_model_dir):
    recipe = head_recipe(tmp_path, tiny_model_dir, "cls", max_steps=20, learning_rate=1e-2, logging_steps=5)
    code, out = cli(["run", str(recipe)])  # tunesmith run trains the head and scores it like any contender
    assert code == 0, out
    run = tmp_path / "runs" / "cls" / "train"
    assert (run / "classifier/adapter_model.safetensors").is_file()
    metrics = json.loads((run.parent / "eval/metrics.json").read_text())["finetuned"]
    assert metrics["n"] == 9 and 0 <= metrics["accuracy"] <= 1 and metrics["scoring"] == "classifier head"
    preds = [json.loads(line) for line in (run.parent / "eval/predictions.jsonl").read_text().splitlines()]
    preds = [p for p in preds if p["model"] == "finetuned"]
    assert len(preds) == 9
    for p in preds:
        assert set(p["probabilities"]) == set(LABELS) and abs(sum(p["probabilities"].values()) - 1) < 1e-5
        assert p["parsed"] == max(p["probabilities"], key=p["probabilities"].get)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["kind"] == "classifier" and summary["trainable_tensors_changed"] > 0
    assert summary["peak_memory_mb"] > 0  # the plain Trainer logs no memory: the progress callback records it
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert rows and all(float(r["tokens_per_second"]) > 0 and float(r["peak_memory_mb"]) > 0 for r in rows)
    state = json.loads(max((run / "checkpoints").glob("checkpoint-*/trainer_state.json")).read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert losses[-1] < losses[0], losses


def _train_with_a_long_text(cli, tmp_path, model_dir, name: str, **train) -> tuple[str, Path]:
    """Train a classifier head (max_seq_length 24) on banking rows, one of them far over 24 tokens; (output, run)."""
    rows = banking_rows(LABELS, 8)
    rows[0] = {**rows[0], "text": "my new card has still not arrived " * 8}  # far over 24 tokens
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    recipe = write_recipe(tmp_path / "r.yaml", banking_recipe(
        tmp_path, model_dir, data, name=name, seed=4, split={"train": 18, "val": 0, "test": 6},
        train={"head": "classifier", "max_steps": 2, "batch_size": 6, "max_seq_length": 24, **train}))
    code, out = cli(["train", str(recipe)])
    assert code == 0, out
    return out, tmp_path / "runs" / name


def test_classifier_sets_aside_training_texts_longer_than_max_seq_length_when_asked(cli, tmp_path, tiny_model_dir):
    out, run = _train_with_a_long_text(cli, tmp_path, tiny_model_dir, "cls-long", long_inputs="set_aside")
    rejected = [json.loads(line) for line in (run / "data" / "rejected.jsonl").read_text().splitlines()]
    long_ones = [r for r in rejected if "train.max_seq_length 24" in r["reason"]]
    assert long_ones and all(r["stage"] == "train" for r in long_ones)
    assert "set aside" in out
    assert json.loads((run / "train" / "summary.json").read_text())["set_aside_too_long"] == len(long_ones)


def test_classifier_cuts_training_texts_longer_than_max_seq_length_by_default(cli, tmp_path, tiny_model_dir):
    out, run = _train_with_a_long_text(cli, tmp_path, tiny_model_dir, "cls-cut")
    assert "had their longest input cut to fit (none dropped)" in out
    assert json.loads((run / "train" / "summary.json").read_text())["set_aside_too_long"] == 0
    assert not (run / "data" / "rejected.jsonl").is_file() or "max_seq_length" not in (
        run / "data" / "rejected.jsonl").read_text()


def test_classifier_head_with_full_fine_tuning_saves_and_scores_the_whole_model(cli, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(LABELS, 12))
    recipe = write_recipe(tmp_path / "r.yaml", banking_recipe(
        tmp_path, tiny_model_dir, data, name="cls-full", seed=4, split={"train": 27, "val": 0, "test": 9},
        train={"head": "classifier", "adapter": "full", "max_steps": 12, "batch_size": 9, "learning_rate": 1e-3,
               "logging_steps": 4, "max_seq_length": 64, "lr_scheduler": "constant"},
        eval={"baselines": ["majority"], "max_new_tokens": 4}))
    code, out = cli(["run", str(recipe)])
    assert code == 0, out
    saved = tmp_path / "runs" / "cls-full" / "train" / "classifier"
    assert (saved / "model.safetensors").is_file() and not (saved / "adapter_config.json").exists()
    summary = json.loads((saved.parent / "summary.json").read_text())
    assert summary["trainable_params"] == summary["total_params"]  # every weight trained, not an adapter
    metrics = json.loads((saved.parent.parent / "eval/metrics.json").read_text())["finetuned"]
    assert metrics["n"] == 9 and metrics["scoring"] == "classifier head"


def test_a_head_that_learns_nothing_is_said_in_its_summary_and_the_report(cli, tmp_path, tiny_model_dir):
    """A head whose loss never leaves the label shares' entropy (here: a learning rate too small to move it;
    on real data, a collapse) answers one label for everything; the training summary and report say so."""
    recipe = head_recipe(tmp_path, tiny_model_dir, "flat", max_steps=8, learning_rate=1e-9, logging_steps=2)
    code, out = cli(["run", str(recipe)])
    assert code == 0, out
    assert "learned (almost) nothing beyond the label shares" in " ".join(out.split())
    run = tmp_path / "runs" / "flat"
    assert "learned (almost) nothing" in json.loads((run / "train/summary.json").read_text())["warning"]
    assert "learned (almost) nothing beyond the label shares" in (run / "report.md").read_text()


def test_stalled_at_prior_compares_the_last_losses_with_the_label_entropy():
    import math

    from tunesmith.train.heads import stalled_at_prior

    balanced = [0, 1] * 50
    collapsed = [0.845, 0.757, 0.787, 0.707, 0.694, 0.695]  # NSMC polarity's LLM head, measured
    warning = stalled_at_prior(balanced, collapsed)
    assert warning and f"{math.log(2):.3f}" in warning
    assert stalled_at_prior(balanced, [0.69, 0.5, 0.3, 0.2]) is None  # it learned
    assert stalled_at_prior([0] * 9 + [1], [0.33, 0.33]) is not None  # 0.325 nats: the shares of a 9:1 split
    assert stalled_at_prior([0] * 9 + [1], [0.33, 0.2]) is None
    assert stalled_at_prior([1] * 10, [0.5]) is None and stalled_at_prior(balanced, []) is None
