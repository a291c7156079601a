"""benchmarks/gpu_quality.py: the GPU-path quality check runs the real recipes and compares against the CPU run
records of this repository. On a CPU its smoke run trains the demo recipe 2 steps on the path chosen here and
skips QLoRA with a note; the comparison rule is checked on its own."""

import importlib.util
import sys
from pathlib import Path

import pytest

from tunesmith.models import registry

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_quality", REPO / "benchmarks" / "gpu_quality.py")
gq = importlib.util.module_from_spec(spec)
sys.modules["gpu_quality"] = gq
spec.loader.exec_module(gq)


def test_the_references_are_this_repositorys_cpu_records():
    for case in gq.CASES.values():
        ref = gq.reference(case, gq.RECORDS)
        assert ref is not None, case.reference
        assert "no GPU" in ref["machine"]  # a CPU fp32 run
        for arm in case.arms:
            assert 0.5 < ref["contenders"][arm]["value"] < 1, (case.name, arm)
        assert ref["n"] == (150 if case.name == "demo" else 600)


def test_within_two_points_or_not():
    assert gq.compare(0.915, 0.927) == ("-1.2", "within 2 points")
    assert gq.compare(0.95, 0.927)[1] == "within 2 points"
    assert gq.compare(0.90, 0.927) == ("-2.7", "MORE than 2 points below")
    assert gq.compare(0.9, None)[1] == "no reference" and gq.compare(None, 0.9)[1] == "no result"


@pytest.mark.slow
@pytest.mark.bench  # make test-benchmarks
@pytest.mark.skipif(not registry.is_cached("smollm2-135m-instruct"), reason="the embedded model is not cached")
def test_smoke_run_trains_the_demo_on_this_machines_path_and_records_it(tmp_path, capsys):
    code = gq.main(["--cases", "demo", "--smoke", "--out", str(tmp_path / "runs"), "--record-to", str(tmp_path / "rec")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "QLoRA needs a CUDA GPU" in out  # skipped here, with a note
    row = next(line for line in out.splitlines() if line.startswith("| demo | finetuned | auto |"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[4].startswith("cpu float32") and cells[6] == "n=8"
    assert cells[9] == "no reference"  # a smoke run scores 8 rows, not the record's 150: nothing compared
    assert (tmp_path / "rec" / "gpu-quality-demo-auto-smoke.json").is_file()
