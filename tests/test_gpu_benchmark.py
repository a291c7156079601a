"""benchmarks/gpu_train.py runs at tiny size on a CPU, and both sides train on the same rows from the same
weights (their losses after the same steps agree)."""

import os
import runpy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TUNESMITH_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.mark.bench  # make test-benchmarks
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


def _load_bench():
    return runpy.run_path(str(REPO / "benchmarks" / "gpu_train.py"))


def _args(bench, *argv):
    return bench["parse_args"](list(argv))


def test_the_unsloth_side_gets_its_own_packages_ahead_and_the_others_do_not(tmp_path, monkeypatch):
    bench = _load_bench()
    monkeypatch.setenv("PYTHONPATH", "/kit/site:/repo/src")
    args = _args(bench, "--unsloth-site", str(tmp_path))
    env = bench["side_env"](args, "unsloth", "cuda")
    assert env["PYTHONPATH"] == f"{tmp_path}{os.pathsep}/kit/site:/repo/src"  # its transformers shadow the kit's
    assert "UNSLOTH_FORCE_CPU" not in env and env["UNSLOTH_COMPILE_LOCATION"]
    assert bench["side_env"](args, "unsloth", "cpu")["UNSLOTH_FORCE_CPU"] == "1"  # Unsloth's CPU backend
    for side in ("ours", "trl", "ours-head"):
        assert bench["side_env"](args, side, "cuda")["PYTHONPATH"] == "/kit/site:/repo/src"


def test_a_missing_unsloth_gives_a_note_and_no_side(tmp_path, capsys):
    bench = _load_bench()
    cfg = bench["CONFIGS"]["1b-lora"]
    sides = bench["sides_of"](cfg, _args(bench, "--unsloth-site", str(tmp_path)), "cuda")
    assert [s[1] for s in sides] == ["ours", "trl"]
    assert f"no unsloth package in {tmp_path}" in capsys.readouterr().out
    (tmp_path / "unsloth").mkdir()
    assert [s[1] for s in bench["sides_of"](cfg, _args(bench, "--unsloth-site", str(tmp_path)), "cuda")] == [
        "ours", "trl", "unsloth"]


def test_a_failing_side_is_reported_and_the_run_goes_on(monkeypatch, capsys):
    """A side whose process fails (a peer that breaks on this machine) costs its row, not the rest of the run."""
    import subprocess

    bench = _load_bench()
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd[-1])
        return subprocess.CompletedProcess(cmd, 1, stdout="partial output\n", stderr="Traceback: boom\n")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(bench["SideFailed"], match="exit 1"):
        bench["in_child"](_args(bench), "1b-lora", "unsloth", "auto", "cuda")
    assert calls == ["1b-lora:unsloth:auto"]
    out = capsys.readouterr().out
    assert "partial output" in out and "boom" in out


UNSLOTH_SITE = os.environ.get("TUNESMITH_UNSLOTH_SITE")


@pytest.mark.skipif(not UNSLOTH_SITE, reason="set TUNESMITH_UNSLOTH_SITE to a folder with the kit's Unsloth part "
                                              "installed (scripts/gpu_kit.sh --unsloth; pip install --target)")
@pytest.mark.skipif(not (SHARED / "banking77").is_dir(), reason=f"shared data not found at {SHARED}")
def test_the_unsloth_side_trains_with_the_kits_packages(tiny_model_dir, home, monkeypatch, capsys):
    """The kit's Unsloth part (its pinned transformers, trl and datasets) runs the Unsloth side, here on Unsloth's
    CPU backend, to a loss that agrees with TRL's on the same rows."""
    argv = ["gpu_train.py", "--tiny", "--configs", "1b-lora", "--steps", "2", "--rows-per-source", "6",
            "--seq-len", "128", "--tokenizer", str(tiny_model_dir), "--unsloth-site", UNSLOTH_SITE]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(REPO / "benchmarks" / "gpu_train.py"), run_name="__main__")
    out = capsys.readouterr().out
    sides = {cells[2].strip(): cells for cells in (line.split("|") for line in out.splitlines()
                                                   if line.startswith("| 1b-lora |"))}
    assert set(sides) == {"tunesmith", "TRL", "Unsloth"}, out
    assert "Unsloth 2026" in sides["Unsloth"][11] and "transformers 5.17" in sides["Unsloth"][11]
    number = lambda cell: float(cell.replace(",", ""))  # noqa: E731
    assert number(sides["Unsloth"][8]) == pytest.approx(number(sides["TRL"][8]), abs=5e-3)


def test_reference_adds_the_products_reference_path_as_a_side_of_each_method():
    bench = _load_bench()
    args = _args(bench, "--reference", "--no-trl")
    labels = {name: [label for label, _, _ in bench["sides_of"](bench["CONFIGS"][name], args, "cuda")]
              for name in ("1b-lora", "1b-head", "1b-dpo")}
    assert labels["1b-lora"] == ["tunesmith", "tunesmith reference"]
    if bench["BANKING"].is_file():
        assert labels["1b-head"] == ["tunesmith head", "tunesmith reference head"]
    if bench["DPO_PAIRS"].is_file():
        assert labels["1b-dpo"] == ["tunesmith DPO", "tunesmith reference DPO"]
    assert "reference" not in str(bench["sides_of"](bench["CONFIGS"]["1b-lora"], _args(bench, "--no-trl"), "cuda"))
