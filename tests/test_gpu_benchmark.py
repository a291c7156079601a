"""benchmarks/gpu_train.py runs at tiny size on a CPU (``--smoke``), and the sides train on the same rows from the
same weights (their losses after the same steps agree); its sizes (≥16k tokens a step), groups, deadline and rows
checked without running a side."""

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
    argv = ["gpu_train.py", "--smoke", "--configs", "1b-lora,1b-grpo" + (",1b-dpo" if dpo else ""),
            "--tokenizer", str(tiny_model_dir)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(REPO / "benchmarks" / "gpu_train.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "matmul peak" in out and "TINY models" in out
    table = [line.split("|") for line in out.splitlines() if line.startswith(("| 1b-lora |", "| 1b-dpo |", "| 1b-grpo"))]
    sides = {cells[2].strip(): cells for cells in table}
    assert set(sides) == {"tunesmith", "tunesmith, checkpointing off", "TRL", "TRL tuned", "tunesmith GRPO",
                          "TRL GRPO"} | ({"tunesmith DPO", "TRL DPO"} if dpo else set()), out
    assert out.count("loss check 1b-lora:") == 3 and "OUTSIDE" not in out  # each side's first step against ours
    assert "real, " in out and "computed on (rows x width)" in out
    number = lambda cell: float(cell.replace(",", ""))  # noqa: E731
    for ours, theirs in [("tunesmith", "TRL"), ("tunesmith", "TRL tuned")] + (
            [("tunesmith DPO", "TRL DPO")] if dpo else []):
        assert number(sides[ours][8]) == pytest.approx(number(sides[theirs][8]), abs=2e-3)  # last loss, same steps
        assert "cpu float32" in sides[ours][13] and number(sides[ours][4]) > 0
        assert number(sides[theirs][10]) > 0  # host syncs per step: TRL's metrics read the device every step
    assert number(sides["tunesmith"][7]) > 0  # the memory estimator's peak beside the measured one
    assert "host syncs per training step" in out and "≈ 512 tokens" in out  # --smoke's tokens per step
    for side in ("tunesmith GRPO", "TRL GRPO"):  # the step split into rollout, reward and update; the mean reward
        cells = sides[side]
        assert "rollout" in cells[12] and "update" in cells[12] and cells[9].strip().startswith("reward ")
        assert number(cells[4]) > 0


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
    assert [s[1] for s in sides] == ["ours", "ours-nockpt", "trl", "trl-tuned"]
    assert f"no unsloth package in {tmp_path}" in capsys.readouterr().out
    (tmp_path / "unsloth").mkdir()
    assert [s[1] for s in bench["sides_of"](cfg, _args(bench, "--unsloth-site", str(tmp_path)), "cuda")] == [
        "ours", "ours-nockpt", "trl", "trl-tuned", "unsloth", "unsloth-plain"]


def test_like_for_like_sides_their_settings_and_at_least_ten_timed_steps():
    """tunesmith on the product's checkpointing rule and with it off; TRL's defaults and TRL tuned (no checkpointing,
    padding-free); the profiled step is never a timed one."""
    bench = _load_bench()
    assert bench["trl_tuned"]()["gradient_checkpointing"] is False and bench["trl_tuned"]()["padding_free"] is True
    args = _args(bench)
    assert args.steps - args.warmup >= 10
    profiled = _args(bench, "--profile")
    assert profiled.steps - 1 - profiled.warmup >= 10
    labels = [s[0] for s in bench["sides_of"](bench["CONFIGS"]["1b-lora"], _args(bench), "cuda")]
    assert labels[:2] == ["tunesmith", "tunesmith, checkpointing off"] and "TRL tuned" in labels
    # --checkpointing names tunesmith's one setting: no second side
    assert "ours-nockpt" not in [s[1] for s in bench["sides_of"](bench["CONFIGS"]["1b-lora"],
                                                                 _args(bench, "--checkpointing", "on"), "cuda")]


def test_the_loss_check_names_a_side_whose_first_steps_differ(capsys):
    """The first step (same weights) and the two after it (same gradients, if the sides compute them alike)."""
    bench = _load_bench()
    cfg = bench["CONFIGS"]["1b-lora"]
    ours = [11.76, 11.2, 10.5]
    assert bench["loss_check"](cfg, [("tunesmith", ours), ("TRL", [11.7601, 11.201, 10.49]),
                                     ("TRL tuned", [11.759, 11.2, 10.5])], "cpu") == []
    failed = bench["loss_check"](cfg, [("tunesmith", ours), ("TRL", [11.7601, 11.5, 10.5])], "cpu")
    assert failed == ["1b-lora TRL: step 2 loss 11.5000 vs tunesmith's 11.2000, over 0.002"]
    assert "OUTSIDE 0.002 relative" in capsys.readouterr().out
    assert bench["loss_check"](bench["CONFIGS"]["1b-grpo"], [("a", [1.0]), ("b", [2.0])], "cpu") == []


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
    argv = ["gpu_train.py", "--smoke", "--configs", "1b-lora", "--tokenizer", str(tiny_model_dir),
            "--unsloth-site", UNSLOTH_SITE]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(REPO / "benchmarks" / "gpu_train.py"), run_name="__main__")
    out = capsys.readouterr().out
    sides = {cells[2].strip(): cells for cells in (line.split("|") for line in out.splitlines()
                                                   if line.startswith("| 1b-lora |"))}
    assert set(sides) == {"tunesmith", "TRL", "Unsloth"}, out
    assert "Unsloth 2026" in sides["Unsloth"][13] and "transformers 5.17" in sides["Unsloth"][13]
    number = lambda cell: float(cell.replace(",", ""))  # noqa: E731
    assert number(sides["Unsloth"][8]) == pytest.approx(number(sides["TRL"][8]), abs=5e-3)


def test_reference_adds_the_products_reference_path_as_a_side_of_each_method():
    bench = _load_bench()
    args = _args(bench, "--reference", "--no-trl")
    labels = {name: [label for label, _, _ in bench["sides_of"](bench["CONFIGS"][name], args, "cuda")]
              for name in ("1b-lora", "1b-head", "1b-dpo")}
    assert labels["1b-lora"] == ["tunesmith", "tunesmith, checkpointing off", "tunesmith reference"]
    if bench["BANKING"].is_file():
        assert labels["1b-head"] == ["tunesmith head", "tunesmith reference head"]
    if bench["DPO_PAIRS"].is_file():
        assert labels["1b-dpo"] == ["tunesmith DPO", "tunesmith reference DPO"]
    assert "reference" not in str(bench["sides_of"](bench["CONFIGS"]["1b-lora"], _args(bench, "--no-trl"), "cuda"))


def test_a_step_is_16k_tokens_split_alike_and_the_groups_are_one_command_each():
    bench = _load_bench()
    args = _args(bench)
    assert args.tokens_per_step >= 16384 and args.steps - args.warmup == 10
    cfg = bench["CONFIGS"]
    assert set(bench["GROUPS"]["1b"].split(",")) | set(bench["GROUPS"]["8b"].split(",")) == set(cfg)
    assert _args(bench, "--configs", "8b").configs == "8b-lora,8b-qlora,2b-full"
    assert bench["split"](34, cfg["2b-full"], args) == (8, 4)  # 34 examples: 4 micro-steps of 8
    assert bench["split"](34, cfg["2b-full"], _args(bench, "--accum", "2")) == (17, 2)
    assert bench["split"](3, cfg["8b-qlora"], args) == (1, 3)  # never more micro-steps than examples
    smoke = _args(bench, "--smoke")
    assert smoke.tiny and smoke.steps == 3 and smoke.tokens_per_step == 512


def test_the_deadline_skips_what_cannot_start_and_bounds_the_rest(monkeypatch, capsys):
    """--deadline: each side runs with at most what is left of it (not the longer --side-timeout); once too little
    is left, the remaining sides are named as not started, their rows missing, the others printed."""
    import time

    bench = _load_bench()
    run_sides = bench["run_sides"]
    args = _args(bench, "--deadline", "100", "--side-timeout", "500", "--configs", "1b-lora", "--no-trl",
                 "--reference", "--checkpointing", "off")  # one tunesmith side, then the reference
    clock = iter([0.0, 0.0, 80.0])  # the start; the first side at 0 s; the second at 80 s: 20 s left
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    given = []
    row = {"tokens_per_s": 10.0, "params": 100, "steps": 3, "peak_mb": 1.0, "last_loss": 1.0, "late_loss": 1.0,
           "syncs_per_step": 0.0, "sync_sites": [], "path": "p"}
    monkeypatch.setitem(run_sides.__globals__, "in_child",
                        lambda a, c, s, at, d, timeout=None: given.append(timeout) or row)
    lines, failed = run_sides(args, "cuda", 1e12)
    assert given == [100.0]
    assert failed == ["1b-lora tunesmith reference: not started, 20 s left of --deadline"]
    assert any(line.startswith("| 1b-lora | tunesmith | 3 |") for line in lines)
    assert "not started" in capsys.readouterr().out


def test_a_grpo_row_shows_its_phases_and_reward_and_no_mfu():
    bench = _load_bench()
    r = {"tokens_per_s": 1000.0, "params": 10**9, "steps": 6, "peak_mb": 5000.0, "last_loss": 0.0, "late_loss": 0.0,
         "syncs_per_step": 300.0, "path": "p", "step_s": 4.0, "reward": 0.25, "profile": {"busy_fraction": 0.6},
         "phases": {"step_s": 4.0, "rollout_s": 3.0, "reward_s": 0.1, "update_s": 0.9}}
    cells = [c.strip() for c in bench["row_text"]("1b-grpo", "tunesmith GRPO", r, 1e15).split("|")]
    assert cells[5] == "–" and cells[9] == "reward 0.250" and cells[11] == "60%"
    assert cells[12] == "4.00 (rollout 3.00, reward 0.10, update 0.90)"
    sft = dict(r, phases=None)
    del sft["phases"], sft["reward"]
    assert bench["row_text"]("1b-lora", "tunesmith", sft, 1e15).split("|")[5].strip() == "– (0.6%) · 4·N 0.4%"
    sft["params_compute"] = 5 * 10**8  # without the input embedding
    cell = bench["row_text"]("1b-lora", "tunesmith", sft, 1e15, 2e15).split("|")[5].strip()
    assert cell == "0.1% (0.3%) · 4·N 0.1%"  # 6·N/sheet (6·N/measured) · 4·N/sheet
    assert bench["row_text"]("2b-full", "tunesmith", sft, 1e15, 2e15).split("|")[5].strip() == "0.1% (0.3%)"


def test_the_sheets_peak_and_the_compute_parameters():
    bench = _load_bench()
    assert bench["sheet_peak"]("NVIDIA H100 80GB HBM3") == 989e12 and bench["sheet_peak"]("NVIDIA H100 PCIe") == 756e12
    assert bench["sheet_peak"]("NVIDIA H200") == 989e12 and bench["sheet_peak"]("cpu") is None
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(vocab_size=1000, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    untied = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False))
    counts = bench["param_counts"](untied)
    assert counts["params"] - counts["params_compute"] == 1000 * 16  # the input embedding left out
    tied = bench["param_counts"](LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True)))
    assert tied["params"] == tied["params_compute"]  # the shared weight does the head's matmul


def test_sides_keeps_only_the_named_sides_of_each_method():
    bench = _load_bench()
    args = _args(bench, "--reference", "--sides", "trl,reference")
    got = {name: [side for _, side, _ in bench["sides_of"](bench["CONFIGS"][name], args, "cuda")]
           for name in ("1b-lora", "1b-dpo", "1b-head", "1b-grpo")}
    assert got["1b-lora"] == ["reference", "trl", "trl-tuned"] and got["1b-grpo"] == ["trl-grpo"]
    if bench["DPO_PAIRS"].is_file():
        assert got["1b-dpo"] == ["reference-dpo", "trl-dpo"]
    if bench["BANKING"].is_file():
        assert got["1b-head"] == ["reference-head", "trl-head"]


def test_the_profile_records_the_last_step_only():
    import torch

    bench = _load_bench()

    def run(callbacks):
        for step in range(3):
            x = torch.ones(128, 128)
            torch.sin(x) if step < 2 else x @ x  # only the last step multiplies
            for cb in callbacks:
                cb.on_step_end(None, None, None)
        return "done"

    out, top = bench["_profiled"](run, "cpu", 3)
    assert out == "done" and top["busy_fraction"] is None  # no GPU kernels on a CPU
    ops = [t.rsplit(": ", 1)[0] for t in top["top"]]
    assert "aten::mm" in ops and "aten::sin" not in ops and not any(o.startswith("ProfilerStep") for o in ops), ops


def test_the_estimate_is_taken_at_the_largest_micro_batch_collated():
    bench = _load_bench()
    largest = bench["Largest"](lambda features: {"n": len(features)})
    assert largest([{"input_ids": [1] * 5}, {"input_ids": [1] * 7}]) == {"n": 2}
    largest([{"input_ids": [1] * 3}])
    assert largest.tokens == 12
    import torch

    counted = bench["Largest"](lambda features: {"input_ids": torch.zeros(len(features), 7)})
    counted([{"input_ids": [1] * 5}, {"input_ids": [1] * 7}])
    assert counted.per_step(2) == {"real_tokens_per_step": 24, "padded_tokens_per_step": 28}


def test_without_leaves_out_the_sides_named_exactly(tmp_path):
    bench = _load_bench()
    (tmp_path / "unsloth").mkdir()
    args = _args(bench, "--unsloth-site", str(tmp_path), "--without", "trl-tuned,unsloth-plain")
    assert [s[1] for s in bench["sides_of"](bench["CONFIGS"]["8b-qlora"], args, "cuda")] == ["ours", "trl", "unsloth"]
    assert [s[1] for s in bench["sides_of"](bench["CONFIGS"]["1b-lora"], args, "cuda")] == [
        "ours", "ours-nockpt", "trl", "unsloth"]
