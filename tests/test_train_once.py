"""``tunesmith train`` trains once per settings, as each arm of ``tunesmith run`` does: the same recipe again
is not retrained; another setting removes the old settings' checkpoints and trains from scratch."""

import json

from .conftest import banking_recipe, banking_rows, write_jsonl, write_recipe

FAST = {"max_steps": 2, "batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1, "max_seq_length": 64}


def test_train_twice_is_not_retrained_and_another_setting_is(cli, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(("card_arrival", "pin_blocked", "age_limit"), 4))
    recipe = write_recipe(tmp_path / "r.yaml", banking_recipe(
        tmp_path, tiny_model_dir, data, name="once", seed=3, split={"train": 8, "val": 0, "test": 4}, train=FAST))
    train = tmp_path / "runs" / "once" / "train"
    adapter = train / "adapter" / "adapter_model.safetensors"

    code, out = cli(["train", str(recipe)])
    assert code == 0, out
    done = json.loads((train / "done.json").read_text())
    assert done["summary"]["method"] == "SFT LoRA r=16" and "→" in done["summary"]["train loss first → last"]
    assert "training summary" in out and done["summary"]["tokens trained"] in out
    assert json.loads((train / "started.json").read_text())["fingerprint"] == done["fingerprint"]
    assert list((train / "checkpoints").glob("checkpoint-*"))
    first, written = adapter.read_bytes(), adapter.stat().st_mtime_ns

    code, out = cli(["train", str(recipe)])
    assert code == 0, out
    assert "trained before with the same settings" in out and "not retrained" in out
    assert adapter.stat().st_mtime_ns == written  # nothing trained, nothing saved
    assert done["summary"]["tokens trained"] in out and f"Saved: {adapter.parent}" in out

    code, out = cli(["train", str(recipe), "--set", "train.learning_rate=0.02"])
    assert code == 0, out
    assert "made with other settings; training from scratch" in out and "not retrained" not in out
    assert adapter.read_bytes() != first
    again = json.loads((train / "done.json").read_text())
    assert again["fingerprint"] != done["fingerprint"]
    assert json.loads((train / "summary.json").read_text())["resumed"] is False

    # --resume insists: the checkpoints now belong to the other learning rate, so it refuses rather than remove them
    code, out = cli(["train", str(recipe), "--resume"])
    assert code == 2 and "--resume: the checkpoints" in out and "other settings" in out, out
    assert list((train / "checkpoints").glob("checkpoint-*"))


def test_train_examples_trains_on_a_stratified_sample_and_says_so(cli, tmp_path, tiny_model_dir):
    """``train.examples`` cuts the train split to a seeded sample (each label keeps its share) before the
    fingerprint: the summary says how, the count is what trained, and another size is another training."""
    from collections import Counter

    from tunesmith.config import validate_recipe
    from tunesmith.records import Example
    from tunesmith.runs.once import sampled_train
    from tunesmith.train.jobs import TrainData

    labels = ("card_arrival", "pin_blocked", "age_limit")
    rows = [Example(f"r{i}", {"text": f"t{i}"}, labels[i % 3] if i < 60 else labels[0]) for i in range(90)]
    doc = banking_recipe(tmp_path, tiny_model_dir, tmp_path / "unused.jsonl", name="s", seed=5,
                         split={"train": 8, "val": 0, "test": 4}, train={"examples": 30})
    cut, how = sampled_train(validate_recipe(doc), TrainData(rows, [], list(labels)))
    assert how == "30 of 90, stratified by label, seed 5" and len(cut.train) == 30
    counts = Counter(e.target for e in cut.train)  # the split holds 50 / 20 / 20: shares 5/9, 2/9, 2/9
    assert all(abs(counts[label] - 30 * share) <= 1 for label, share in zip(labels, (5 / 9, 2 / 9, 2 / 9), strict=True))
    assert sampled_train(validate_recipe({**doc, "train": {"examples": 500}}), TrainData(rows))[1] is None

    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(labels, 6))
    recipe = write_recipe(tmp_path / "r.yaml", banking_recipe(
        tmp_path, tiny_model_dir, data, name="sampled", seed=3, split={"train": 12, "val": 0, "test": 6},
        train={**FAST, "examples": 6}))
    code, out = cli(["train", str(recipe)])
    assert code == 0, out
    done = json.loads((tmp_path / "runs" / "sampled" / "train" / "done.json").read_text())
    assert done["summary"]["train split sampled (train.examples)"] == "6 of 12, stratified by label, seed 3"
    assert done["summary"]["training examples (set aside as too long)"] == "6 (0)"
    code, out = cli(["train", str(recipe), "--set", "train.examples=9"])
    assert code == 0 and "not retrained" not in out, out
