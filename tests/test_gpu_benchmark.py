"""benchmarks/gpu_train.py runs at tiny size on a CPU, and both sides train on the same rows from the same
weights (their losses after the same steps agree)."""

import os
import runpy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TUNESMITH_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.mark.skipif(not (SHARED / "banking77").is_dir(), reason=f"shared data not found at {SHARED}")
def test_gpu_benchmark_runs_tiny_and_the_sides_agree_on_the_loss(tiny_model_dir, home, monkeypatch, capsys):
    dpo = (SHARED / "preference" / "llamafactory_dpo_en_demo.json").is_file()
    argv = ["gpu_train.py", "--tiny", "--configs", "1b-lora,1b-dpo" if dpo else "1b-lora", "--steps", "2",
            "--rows-per-source", "6",
            "--seq-len", "128", "--tokenizer", str(tiny_model_dir)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(REPO / "benchmarks" / "gpu_train.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "matmul peak" in out and "TINY models" in out
    table = [line.split("|") for line in out.splitlines() if line.startswith(("| 1b-lora |", "| 1b-dpo |"))]
    sides = {cells[2].strip(): cells for cells in table}
    assert set(sides) == {"tunesmith", "TRL"} | ({"tunesmith DPO", "TRL DPO"} if dpo else set()), out
    number = lambda cell: float(cell.replace(",", ""))  # noqa: E731
    for ours, theirs in [("tunesmith", "TRL")] + ([("tunesmith DPO", "TRL DPO")] if dpo else []):
        assert number(sides[ours][8]) == pytest.approx(number(sides[theirs][8]), abs=2e-3)  # last loss, same steps
        assert "cpu float32" in sides[ours][11] and number(sides[ours][4]) > 0
        assert number(sides[theirs][10]) > 0  # host syncs per step: TRL's metrics read the device every step
    assert number(sides["tunesmith"][7]) > 0  # the memory estimator's peak beside the measured one
    assert "host syncs per training step" in out
