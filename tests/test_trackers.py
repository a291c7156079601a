"""train.report_to: a tracker writes offline under the run's train folder, with the loss in it."""

import pytest

from .conftest import banking_recipe, banking_rows, write_jsonl, write_recipe


def _recipe(tmp_path, tiny_model_dir, report_to):
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(("card_arrival", "pin_blocked"), 8))
    return write_recipe(tmp_path / "r.yaml", banking_recipe(
        tmp_path, tiny_model_dir, data, name="tracked", seed=3, split={"train": 12, "val": 0, "test": 4},
        train={"max_steps": 4, "batch_size": 4, "logging_steps": 1, "max_seq_length": 64, "report_to": report_to}))


def test_tensorboard_events_hold_the_training_loss(cli, tmp_path, tiny_model_dir):
    pytest.importorskip("tensorboard", reason="tensorboard is in the dev extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code, out = cli(["train", str(_recipe(tmp_path, tiny_model_dir, ["tensorboard"]))])
    assert code == 0, out
    folder = tmp_path / "runs" / "tracked" / "train" / "tensorboard"
    assert list(folder.glob("events.out.tfevents.*")), list(folder.parent.iterdir())
    events = EventAccumulator(str(folder))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == 4 and all(v > 0 for v in losses)


def test_missing_tracker_names_the_extra(cli, tmp_path, tiny_model_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    code, out = cli(["train", str(_recipe(tmp_path, tiny_model_dir, ["mlflow"]))])
    assert code == 2 and "tunesmith[mlflow]" in out, out
