"""benchmarks/fencing.py end to end at ``--quick`` size (the tiny random Llama, a few of each): every part on both
backends, the denominators from a real `tunesmith serve`, and the table's rows in its output and its JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .pg import missing

pytestmark = pytest.mark.bench  # make test-benchmarks
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fencing.py"


@pytest.mark.skipif(missing() is not None, reason=missing() or "")
def test_quick_run_measures_both_ways_on_both_backends(tmp_path):
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["backends"]) == {"sqlite", "postgresql"}
    for kind, parts in result["backends"].items():
        assert parts["lines"]["ours"]["n"] == parts["lines"]["before"]["n"] == 60
        assert parts["step_writes"]["ours"]["n"] == parts["step_writes"]["before"]["n"] == 60
        assert len(parts["training"]["fenced"]["jobs"]) == len(parts["training"]["unfenced"]["jobs"]) == 1
        assert ("places" in parts) == (kind == "postgresql")
    assert result["answers"]["chat"]["n"] == 3 and result["answers"]["line_ms"] > 0
    assert len(result["table"]) == 10 and all(row[0] in run.stdout for row in result["table"])
    assert "load average at the start" in run.stdout and "load average at the end" in run.stdout
