"""benchmarks/hostile_tenant.py end to end at a tiny setting: two attacks (a ``multi`` grader's huge power, a body
with no key) each on a fresh `tunesmith serve`, and the JSON it writes holds each attack's fields, whether the
server held or froze."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith.models import registry

pytestmark = [pytest.mark.slow, pytest.mark.bench]  # make test-benchmarks
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "hostile_tenant.py"
COMMON = ("attack", "b_alone", "b_during", "ratios", "frozen", "b_pairs_during", "attack_ended_s", "a_summary",
          "server_memory", "server_exit_code", "server_stopped_by", "load_average", "b_requests_during")
MEMORY = ("rss_before_mb", "rss_peak_mb", "rss_growth_mb", "rss_after_mb", "hwm_before_mb", "hwm_after_mb")


@pytest.mark.skipif(not registry.is_cached("smollm2-135m-instruct"),
                    reason="smollm2-135m-instruct not cached; run `tunesmith models pull`")
def test_two_attacks_on_fresh_servers_write_every_field(tmp_path):
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--attacks", "formula,body", "--quiet-requests", "3",
                          "--chat-timeout", "20", "--body-mb", "30", "--out", str(out)],
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["engine"] == "builtin" and list(result["attacks"]) == ["formula", "body"]
    assert len(result["lines"]) == 2 and all(line in run.stdout for line in result["lines"])
    for name, attack in result["attacks"].items():
        assert set(COMMON) <= set(attack), (name, sorted(set(COMMON) - set(attack)))
        assert attack["b_alone"]["models"]["n"] == 3 and attack["b_alone"]["chat"]["n"] == 3
        assert {"p50_s", "p99_s", "mean_s"} <= set(attack["b_alone"]["chat"]) and "outcomes" in attack["b_during"]
        requests = attack["b_requests_during"]
        assert requests and {r["kind"] for r in requests} <= {"models", "chat"}
        assert all(r["outcome"] == "200" or r["outcome"].isdigit() or r["outcome"] in ("no_answer", "connection_error")
                   for r in requests)
        # a request with no answer counts as its timeout; two in a row mean the server froze and B stopped
        assert all(r["seconds"] == {"models": 10.0, "chat": 20.0}[r["kind"]] for r in requests
                   if r["outcome"] == "no_answer")
        assert attack["frozen"] == (attack["b_during"]["no_answer"] >= 2 and
                                    [r["outcome"] for r in requests[-2:]] == ["no_answer"] * 2)
        assert attack["server_stopped_by"] == "SIGKILL" or not attack["frozen"]
        assert set(MEMORY) <= set(attack["server_memory"]) and attack["server_memory"]["rss_before_mb"] > 0
        assert len(attack["load_average"]) == 3
    run_ = result["attacks"]["formula"]["a_graders_run"]
    assert run_["status"] in ("200", "400", "429", "no_answer") and run_["seconds"] >= 0
    body = result["attacks"]["body"]
    assert body["body_mb"] == 30 and 0 <= body["mb_sent_at_answer"] <= body["mb_sent"] <= 30
    assert body["status"] in ("401", "413", "no_answer"), body
