"""Evaluation memory does not grow with the number of labels: 77 and 300 labels stay within 3 GB resident
on the embedded model (each measured in a fresh process by the benchmark script's child mode; the benchmark
itself also measures 500). Before bounded label chunks, 77 labels took 13.7 GB (docs/benchmarks.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith.models import registry

pytestmark = [pytest.mark.slow, pytest.mark.bench]  # make test-benchmarks
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "label_scoring_memory.py"
LIMIT_MB = 3 * 1024


@pytest.mark.skipif(not registry.is_cached("smollm2-135m-instruct"),
                    reason="smollm2-135m-instruct not cached; run `tunesmith models pull`")
@pytest.mark.parametrize("labels, prompts", [(77, 3), (300, 1)])
def test_evaluation_memory_is_bounded_whatever_the_label_count(labels, prompts):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, str(SCRIPT), "--child", str(labels), "bounded", str(prompts)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["labels"] == labels and result["prompts"] == prompts
    # the base prompt lists every label (about 3,000 tokens for 300): memory still stays under the bound
    assert result["peak_rss_mb"] < LIMIT_MB, result
