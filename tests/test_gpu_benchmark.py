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
    argv = ["gpu_train.py", "--tiny", "--configs", "1b-lora", "--steps", "2", "--rows-per-source", "6",
            "--seq-len", "128", "--tokenizer", str(tiny_model_dir)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(REPO / "benchmarks" / "gpu_train.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "matmul peak" in out and "TINY models" in out
    table = [line.split("|") for line in out.splitlines() if line.startswith("| 1b-lora |")]
    sides = {cells[2].strip(): cells for cells in table}
    assert set(sides) == {"tunesmith", "TRL"}, out
    ours, trl = (float(sides[s][7]) for s in ("tunesmith", "TRL"))  # last loss, same steps
    assert ours == pytest.approx(trl, abs=2e-3)
    assert "cpu float32" in sides["tunesmith"][10] and float(sides["tunesmith"][4].replace(",", "")) > 0
    assert float(sides["TRL"][9]) > 0  # host syncs per step: TRL's metrics read the device every step
    assert "host syncs per training step" in out
