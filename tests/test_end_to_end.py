"""`tunesmith run` end to end on a random 2-layer model and 50 real rows: seconds, not minutes."""

import csv
import json

import torch
from safetensors.torch import load_file

from .conftest import banking_rows, write_recipe

LABELS = ("card_arrival", "pin_blocked", "age_limit")


def test_run_writes_everything_and_learns(cli, tmp_path, tiny_model_dir):
    rows = banking_rows(LABELS, 17)[:50]
    data = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines.insert(5, '{"text": "truncated')  # malformed line
    lines.insert(9, json.dumps({"text": "no label here"}))  # row missing the target
    data.write_text("\n".join(lines) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", {
        "name": "tiny",
        "output_dir": str(tmp_path / "runs"),
        "seed": 7,
        "model": {"name": str(tiny_model_dir)},
        "data": {"path": str(data), "input_fields": ["text"], "target_field": "category", "on_error": "skip",
                 "system_prompt": "Classify.", "split": {"train": 30, "val": 5, "test": 15}},
        "train": {"max_steps": 16, "batch_size": 4, "learning_rate": 5e-3, "logging_steps": 2, "max_seq_length": 96},
        "eval": {"max_new_tokens": 4, "batch_size": 8},
    })
    code, out = cli(["run", str(recipe)])
    assert code == 0, out
    assert "2 record(s) set aside" in out
    run = tmp_path / "runs" / "tiny"
    for rel in ["config.resolved.yaml", "report.md", "data/train.jsonl", "data/val.jsonl", "data/test.jsonl",
                "data/rejected.jsonl", "train/metrics.csv", "train/loss.png", "train/summary.json",
                "train/adapter/adapter_model.safetensors", "eval/metrics.json", "eval/predictions.jsonl",
                "eval/confusion.png"]:
        assert (run / rel).is_file(), rel

    rejected = [json.loads(line) for line in (run / "data/rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 2 and {r["stage"] for r in rejected} == {"read", "target"}
    assert all(r["reason"] and r["source"].startswith(str(data)) for r in rejected)
    assert sum(1 for _ in open(run / "data/test.jsonl")) == 15

    metrics = json.loads((run / "eval/metrics.json").read_text())
    # the default baselines: every one that applies to classification (the strongest cheap ones included)
    assert set(metrics) == {"base", "finetuned", "majority", "tfidf_logreg", "tfidf_svm", "embed_logreg"}
    assert all(0 <= m["accuracy"] <= 1 and m["n"] == 15 for m in metrics.values())
    preds = [json.loads(line) for line in (run / "eval/predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 6 * 15 and {"id", "prompt", "output", "parsed", "gold", "correct"} <= set(preds[0])

    report = (run / "report.md").read_text()
    assert report.index("| contender |") < report.index("## Data")
    # the run's own peak (evaluation included) is kept across the training's reset of the peak mark
    peaks = json.loads((run / "memory.json").read_text())
    train_peak = json.loads((run / "train/summary.json").read_text())["peak_memory_mb"]
    assert peaks["training: finetuned"] == round(train_peak)
    assert peaks["the run (largest below)"] == max(peaks["this process, evaluation included"], round(train_peak))
    assert peaks["this process, evaluation included"] >= round(train_peak) and "## Peak memory (MB)" in report

    with open(run / "train/metrics.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    openai_columns = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    assert list(table[0])[:5] == openai_columns
    losses = [float(r["train_loss"]) for r in table if r["train_loss"]]
    assert losses[-1] < losses[0], losses
    assert any(r["valid_loss"] for r in table)

    # every LoRA tensor moved away from its (seeded) initial value
    from transformers import AutoModelForCausalLM

    from tunesmith.config import LoraSection
    from tunesmith.models.loading import wrap_adapter

    init = wrap_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), "lora", LoraSection(), seed=7)
    initial = {n.replace(".default", ""): p.detach() for n, p in init.named_parameters() if "lora_" in n}
    trained = load_file(run / "train/adapter/adapter_model.safetensors")
    assert set(trained) == set(initial) and len(trained) == 2 * 7 * 2  # A and B, 7 linear layers, 2 blocks
    unchanged = [k for k in trained if torch.equal(trained[k], initial[k])]
    assert unchanged == []
    summary = json.loads((run / "train/summary.json").read_text())
    assert summary["trainable_tensors_changed"] == summary["trainable_tensors"] == 28
