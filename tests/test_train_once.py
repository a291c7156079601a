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
    assert done["summary"]["method"] == "sft / lora r=16" and "→" in done["summary"]["train loss first → last"]
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
