"""The Tinker benchmarks run end to end at tiny size on a CPU: the trainer in process (``benchmarks/tinker_trainer.py``,
what ``scripts/gpu_run.sh tinker`` runs at 1B on a GPU: the engine's sampling against a per-sequence ``generate`` loop,
every way generating the round's tokens, and the four tenants' fused step against one after another, its loss check
agreeing in float32), the sampling round through the API against a per-sequence ``generate`` loop
(``benchmarks/tinker_sampling.py``), every way generating the round's tokens, and the cookbook's ``rl_loop`` against a
server of an earlier commit and one of this tree (``benchmarks/tinker_rl_loop.py``)."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.bench  # make test-benchmarks
def test_tinker_trainer_runs_tiny_and_the_fused_step_trains_as_the_steps_one_after_another(tiny_model_dir, tmp_path,
                                                                                         monkeypatch, capsys):
    out = tmp_path / "steps.json"
    monkeypatch.setattr(sys, "argv", ["tinker_trainer.py", "--model", str(tiny_model_dir), "--batch", "2",
                                      "--steps", "2", "--block", "1", "--prompts", "2", "--group", "2",
                                      "--max-tokens", "4", "--sampling-rounds", "1", "--out", str(out)])
    runpy.run_path(str(REPO / "benchmarks" / "tinker_trainer.py"), run_name="__main__")
    result = json.loads(out.read_text())
    (size,) = result["sizes"]
    # float32 on a CPU: the same losses, step after update, every way
    assert max(size["loss_check_max_rel_diff"].values()) < 1e-5
    assert size["tokens_a_step"] > 0 and size["padded_tokens_fused_step"] >= size["tokens_a_step"]
    assert set(size["ways"]) == {"fused", "one_after_another", "peft_mixed_batch"}
    assert all(w["tokens_per_s"] > 0 for w in size["ways"].values()) and size["speedup"] > 0
    assert set(result["sampling"]["ways"]) == {"engine", "generate_loop"} and result["sampling"]["speedup"] > 0
    assert "fused / one after another:" in capsys.readouterr().out


@pytest.mark.bench
def test_tinker_sampling_runs_tiny_through_a_real_server(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sampling.json"
    monkeypatch.setattr(sys, "argv", ["tinker_sampling.py", "--prompts", "2", "--group", "2", "--max-tokens", "4",
                                      "--rounds", "1", "--block", "1", "--out", str(out)])
    runpy.run_path(str(REPO / "benchmarks" / "tinker_sampling.py"), run_name="__main__")
    result = json.loads(out.read_text())
    assert set(result["ways"]) == {"api_num_samples", "api_single_calls", "api_four_tenants", "openai_completions",
                                   "generate_loop"}
    assert min(result["ratio_num_samples"], result["ratio_single_calls"], result["ratio_four_tenants"],
               result["tinker_over_openai"]) > 0
    assert "x the generate loop" in capsys.readouterr().out


@pytest.mark.bench
def test_tinker_rl_loop_runs_the_recipe_tiny_against_the_server_before_and_after(tmp_path):
    """The cookbook's rl_loop, one tiny step, against a server of the commit before samples were the engine's rows (a
    git worktree; this tree's HEAD where a shallow clone lacks that commit) and one of this tree; both sides' steps
    read from the recipe's own metrics."""
    out = tmp_path / "rl.json"
    before = "4b6a63a"
    if subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{before}^{{commit}}"]).returncode != 0:
        before = "HEAD"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tinker_rl_loop.py"), "--before", before,
                           "--batch", "2", "--group", "2", "--max-tokens", "4", "--steps", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    for side in ("before", "after"):
        assert result[side]["steps"] == 1 and result[side]["wall_s"] > 0, result
    assert result["speedup"] > 0 and "after / before:" in done.stdout
