"""``tunesmith train --nproc 2`` (torchrun, two gloo ranks on CPU) against one process with the same global
batch: the same loss at every step for SFT, DPO and the classifier head; rank 0 alone writes the run folder.

The recipe's ``batch_size x grad_accum`` is the global batch: one process takes micro-batches of 4 with 2
accumulation steps, each of the two ranks one micro-batch of 4. Measured on this CPU: the trajectories
were identical (relative difference 0.0 at every step for all three methods); the tests allow 1e-5
for float summation order on other machines.

``train.distributed: fsdp`` (full fine-tuning, each rank holding half of every parameter) sums gradients in
another order (reduce-scatter of each rank's half): measured here, the losses differed by a relative 7.7e-8
at most and the saved models' logits by 2.4e-7; the test allows 1e-5 and 1e-4.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from .conftest import banking_recipe, banking_rows, write_jsonl, write_recipe

TOLERANCE = 1e-5
FSDP_LOSS_TOLERANCE = 1e-5  # relative, per step
FSDP_LOGIT_TOLERANCE = 1e-4  # absolute
STEPS = 3
GLOBAL_BATCH = {"batch_size": 4, "grad_accum": 2}  # 2 ranks: 4 x 1 each


def tunesmith(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real command line in a child process (``--nproc`` starts torchrun from there)."""
    return subprocess.run([sys.executable, "-m", "tunesmith", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture()
def env(tmp_path):
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false",
            "TUNESMITH_DATA_CACHE": str(tmp_path / "cache"), "TUNESMITH_HOME": str(tmp_path / "home"),
            "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(_src())) if p)}


def _src():
    from pathlib import Path

    import tunesmith

    return Path(tunesmith.__file__).resolve().parents[1]


def _losses(run_dir) -> list[float]:
    from tunesmith.train.metrics import read_metrics_csv

    rows = read_metrics_csv(run_dir / "train" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    return [r["train_loss"] for r in rows]


def _sft_recipe(tmp_path, model_dir, name, **train):
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(("card_arrival", "pin_blocked", "age_limit"), 10))
    return write_recipe(tmp_path / f"{name}.yaml", banking_recipe(
        tmp_path, model_dir, data, name=name, seed=5, split={"train": 24, "val": 0, "test": 6},
        train={"max_steps": STEPS, **GLOBAL_BATCH, "learning_rate": 5e-3, "logging_steps": 1, "save_steps": STEPS,
               "max_seq_length": 96, "group_by_length": False, "lora": {"dropout": 0.0}, **train}))


def _dpo_recipe(tmp_path, model_dir, name):
    rows = banking_rows(("card_arrival", "pin_blocked"), 8)
    pairs = [{"prompt": r["text"], "chosen": r["category"], "rejected": "no idea"} for r in rows]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    return write_recipe(tmp_path / f"{name}.yaml", {
        "name": name, "output_dir": str(tmp_path / "runs"), "seed": 5, "model": {"name": str(model_dir)},
        "train": {"method": "dpo", "dpo": {"path": str(path)}, "max_steps": STEPS, **GLOBAL_BATCH,
                  "learning_rate": 5e-3, "logging_steps": 1, "save_steps": STEPS, "max_seq_length": 96,
                  "lora": {"dropout": 0.0}}})


def _compare(tmp_path, env, recipe_for, cli, monkeypatch, command="train", tolerance=TOLERANCE):
    one, two = recipe_for("one"), recipe_for("two")
    for key in ("TUNESMITH_DATA_CACHE", "TUNESMITH_HOME"):
        monkeypatch.setenv(key, env[key])
    code, out = cli(["train", str(one)])  # the one-process reference, in this process
    assert code == 0, out
    double = tunesmith([command, str(two), "--nproc", "2"], env)
    assert double.returncode == 0, double.stdout[-3000:] + double.stderr[-3000:]
    runs = tmp_path / "runs"
    a, b = _losses(runs / "one"), _losses(runs / "two")
    print("losses, one process:", a, "two ranks:", b, "largest relative difference:",
          max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True)))
    assert b == pytest.approx(a, rel=tolerance), (a, b)
    assert len(set(a)) > 1  # it trained: the loss moved
    return double


@pytest.mark.slow
def test_run_sft_lora_two_ranks_match_one_process(tmp_path, tiny_model_dir, env, cli, monkeypatch):
    """`tunesmith run --nproc 2`: both ranks train, rank 0 alone evaluates and writes the report."""
    double = _compare(tmp_path, env, lambda name: _sft_recipe(tmp_path, tiny_model_dir, name), cli, monkeypatch,
                      command="run")
    assert double.stdout.count("Report:") == 1 and double.stdout.count("trained ") == 1  # rank 1 prints nothing
    run = tmp_path / "runs" / "two"
    assert (run / "report.md").is_file() and "finetuned" in (run / "eval" / "metrics.json").read_text()
    assert (run / "train" / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (run / "train" / "checkpoints").iterdir()) == [f"checkpoint-{STEPS}"]
    ckpt = run / "train" / "checkpoints" / f"checkpoint-{STEPS}"
    assert {p.name for p in ckpt.glob("rng_state*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert not list(tmp_path.glob("**/tunesmith-rank1-*"))  # rank 1's scratch data folder is gone


@pytest.mark.slow
def test_dpo_two_ranks_match_one_process(tmp_path, tiny_model_dir, env, cli, monkeypatch):
    _compare(tmp_path, env, lambda name: _dpo_recipe(tmp_path, tiny_model_dir, name), cli, monkeypatch)


@pytest.mark.slow
def test_classifier_head_two_ranks_match_one_process(tmp_path, tiny_model_dir, env, cli, monkeypatch):
    _compare(tmp_path, env, lambda name: _sft_recipe(tmp_path, tiny_model_dir, name, head="classifier"), cli,
             monkeypatch)
    assert (tmp_path / "runs" / "two" / "train" / "classifier" / "labels.json").is_file()


# A rank of `torchrun ... -m tunesmith train RECIPE` (what --nproc starts), plus a callback that SIGKILLs
# rank 1 once step KILL_AT is done: by then rank 0 has written the checkpoint before it (the all-reduce of
# that step waits for rank 0, which saves before stepping on).
RANK_WITH_KILL = """
import os, signal, sys
from transformers import TrainerCallback
import tunesmith.train.sft as sft
from tunesmith.cli import main

class KillRank1(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if os.environ["RANK"] == "1" and state.global_step == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)

build = sft.build_trainer
def build_and_arm(*a, **k):
    trainer = build(*a, **k)
    trainer.add_callback(KillRank1())
    return trainer
sft.build_trainer = build_and_arm
sys.exit(main(["train", sys.argv[1]]))
"""


def _logged(run) -> tuple[list[int], list[float]]:
    from tunesmith.train.resume import complete_checkpoint

    state = json.loads((complete_checkpoint(run / "train" / "checkpoints") / "trainer_state.json").read_text())
    logged = [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]
    return [s for s, _ in logged], [loss for _, loss in logged]


@pytest.mark.slow
def test_kill_one_rank_then_resume_with_one_process(tmp_path, tiny_model_dir, env, cli, monkeypatch):
    # 24 examples, global batch 8: 3 steps an epoch; checkpoints every 2 steps; rank 1 dies after step 3, so
    # the run resumes from step 2, mid-epoch, with another world size: it must skip exactly 16 examples.
    kill_at, steps = 3, 6
    recipe = lambda name: _sft_recipe(tmp_path, tiny_model_dir, name, max_steps=steps, save_steps=2,  # noqa: E731
                                      save_total_limit=3)
    killed = recipe("killed")
    (tmp_path / "rank.py").write_text(RANK_WITH_KILL)
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(tmp_path / "rank.py"), str(killed), str(kill_at)],
                              capture_output=True, text=True, timeout=300, env=env)
    assert torchrun.returncode != 0, torchrun.stdout[-2000:] + torchrun.stderr[-2000:]
    run = tmp_path / "runs" / "killed"
    checkpoints = sorted(p.name for p in (run / "train" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2"], checkpoints  # died after step 3, before the checkpoint of step 4
    assert not (run / "train" / "adapter").exists()

    for key in ("TUNESMITH_DATA_CACHE", "TUNESMITH_HOME"):
        monkeypatch.setenv(key, env[key])
    code, out = cli(["train", str(killed), "--resume", "--nproc", "1"])
    assert code == 0, out
    code, out = cli(["train", str(recipe("straight"))])
    assert code == 0, out
    done, losses = _logged(run)
    ref_steps, ref_losses = _logged(tmp_path / "runs" / "straight")
    assert done == ref_steps == list(range(1, steps + 1))  # every step once: none repeated, none lost
    print("losses, killed at step 3 and resumed with 1 process:", losses, "uninterrupted:", ref_losses)
    assert losses == pytest.approx(ref_losses, rel=TOLERANCE)  # the same examples at every step after resuming


@pytest.mark.slow
def test_full_fine_tuning_two_ranks_saves_the_one_process_model(tmp_path, tiny_model_dir, env, cli, monkeypatch):
    from safetensors.torch import load_file

    _compare(tmp_path, env, lambda name: _sft_recipe(tmp_path, tiny_model_dir, name, adapter="full",
                                                       learning_rate=1e-3), cli, monkeypatch)
    one, two = (load_file(tmp_path / "runs" / n / "train" / "model" / "model.safetensors") for n in ("one", "two"))
    assert set(one) == set(two)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_fsdp_two_ranks_shard_the_model_and_save_the_one_process_model(tmp_path, tiny_model_dir, env, cli,
                                                                       monkeypatch):
    """train.distributed: fsdp on two gloo ranks: each rank holds half of every parameter (a DTensor), the loss
    follows one process's at the same global batch, the gathered model loads with from_pretrained and scores
    like one process's, and a one-process resume of its sharded checkpoint is refused with the way to resume."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = lambda name: _sft_recipe(tmp_path, tiny_model_dir, name, adapter="full", distributed="fsdp",  # noqa: E731
                                      learning_rate=1e-3, save_steps=2)
    _compare(tmp_path, env, recipe, cli, monkeypatch, tolerance=FSDP_LOSS_TOLERANCE)
    run = tmp_path / "runs" / "two" / "train"
    sharding = json.loads((run / "summary.json").read_text())["sharding"]
    print("sharding:", sharding)
    total, per_rank = sharding["parameters"], sharding["parameters_per_rank"]
    assert sharding["ranks"] == 2 and sharding["sharded_tensors"] == sharding["tensors"]
    assert sum(per_rank) == total and all(0.45 * total <= n <= 0.55 * total for n in per_rank), sharding
    ckpt = run / "checkpoints" / "checkpoint-2"
    assert {p.name for p in (ckpt / "pytorch_model_fsdp_0").glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    assert not list(ckpt.glob("*.safetensors"))  # checkpoints stay sharded, one file per rank

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = tok(["my card has not arrived", "my pin is blocked", "how old must I be"], return_tensors="pt",
                padding=True)
    logits = {}
    for name in ("one", "two"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / name / "train" / "model").eval()
        with torch.no_grad():
            logits[name] = model(**batch).logits
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        moved = (logits["one"] - base(**batch).logits).abs().max().item()
    diff = (logits["two"] - logits["one"]).abs().max().item()
    print(f"largest logit difference, two ranks vs one process: {diff:.2e} (training moved them by {moved:.2e})")
    assert diff <= FSDP_LOGIT_TOLERANCE < moved / 100

    # one process cannot load the sharded checkpoint: the CLI says how to resume it. (Resuming it with 2 ranks —
    # step 3 again with the same loss — was checked when this path was built; it costs ~30 s, kept out of the suite.)
    shutil.rmtree(run / "checkpoints" / "checkpoint-3", ignore_errors=True)
    code, out = cli(["train", str(tmp_path / "two.yaml"), "--resume"])
    assert code == 2 and "is sharded" in out and "--nproc 2" in out, out


def test_fsdp_is_for_full_fine_tuning(tmp_path, tiny_model_dir, cli):
    code, out = cli(["train", str(_sft_recipe(tmp_path, tiny_model_dir, "f", distributed="fsdp"))])
    assert code == 2 and "distributed: fsdp shards full fine-tuning" in out, out


def test_global_batch_is_shared_by_the_ranks():
    from tunesmith.machine.launch import share_batch

    assert share_batch(4, 2, 1) == (4, 2)
    assert share_batch(4, 2, 2) == (4, 1)  # accumulation divided first: same micro-batch, same memory
    assert share_batch(8, 1, 2) == (4, 1)
    assert share_batch(6, 4, 4) == (6, 1)
    assert share_batch(3, 8, 4) == (3, 2)
    with pytest.raises(Exception, match="multiple of 4"):
        share_batch(3, 1, 4)


def test_torchrun_command_for_one_and_several_nodes():
    from tunesmith.machine.launch import strip_launch_options, torchrun_command

    args = strip_launch_options(["train", "r.yaml", "--nproc", "2", "--set", "train.epochs=2", "--nnodes=2",
                                 "--node-rank", "1", "--rdzv-endpoint", "10.0.0.1:29500"])
    assert args == ["train", "r.yaml", "--set", "train.epochs=2"]
    one = torchrun_command(args, 2)
    assert one[1:] == ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "tunesmith", *args]
    many = torchrun_command(args, 8, nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29500")
    assert many[many.index("--nnodes"):many.index("-m", 3)] == [
        "--nnodes", "2", "--node_rank", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", "10.0.0.1:29500",
        "--rdzv_id", "tunesmith"]


@pytest.mark.slow
def test_two_nodes_meet_at_the_rendezvous_endpoint(tmp_path, tiny_model_dir, env):
    """The multi-node command of docs/train.md, both "nodes" on this machine (one process each): they meet at
    node 0's endpoint and train as ranks 0 and 1 of one world."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recipe = _sft_recipe(tmp_path, tiny_model_dir, "nodes", max_steps=1, save_steps=1)
    nodes = [subprocess.Popen([sys.executable, "-m", "tunesmith", "train", str(recipe), "--nproc", "1", "--nnodes", "2",
                               "--node-rank", str(n), "--rdzv-endpoint", f"127.0.0.1:{port}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for n in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs
    ckpt = tmp_path / "runs" / "nodes" / "train" / "checkpoints" / "checkpoint-1"
    assert {p.name for p in ckpt.glob("rng_state*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}  # one world of 2
    assert sum("Saved:" in out for out in outs) == 1  # global rank 0 (on whichever node the rendezvous chose)

