"""Two processes with the gloo backend (torchrun, CPU): rank 0 prepares the data first, both ranks end\nwith the same weights."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from .conftest import banking_rows

WORKER = textwrap.dedent("""
    import os, sys
    import torch
    from pathlib import Path
    from rich.console import Console
    from safetensors.torch import save_file
    import tunesmith.kinds  # registers the task kinds the recipe schema checks
    from tunesmith.config import validate_recipe
    from tunesmith.models.loading import load_model, load_tokenizer, wrap_adapter
    from tunesmith.machine.placement import pick_placement
    from tunesmith.data.prepare import prepare as prepare_data
    from tunesmith.runs.training import main_process_first
    from tunesmith.train.sft import build_trainer
    from tunesmith.train.sft import sft_rows

    model_dir, data_path, out = sys.argv[1], sys.argv[2], sys.argv[3]
    recipe = validate_recipe({"name": "ddp", "output_dir": out, "seed": 2, "model": {"name": model_dir},
                              "data": {"path": data_path, "input_fields": ["text"], "target_field": "category",
                                       "split": {"train": 20, "val": 0, "test": 4}},
                              "train": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-2,
                                        "logging_steps": 1}})
    rank = int(os.environ["RANK"])
    with main_process_first():  # as `tunesmith train` does: rank 0 builds the data, rank 1 finds the cache
        data = prepare_data(recipe, recipe.run_dir / "data", Console(file=sys.stdout))
    print(f"rank {rank} prepared {len(data.splits['train'])} examples", flush=True)
    placement = pick_placement()
    tok = load_tokenizer(model_dir)
    tok.padding_side = "right"
    model = wrap_adapter(load_model(model_dir, placement), "lora", recipe.train.lora, recipe.seed)
    trainer = build_trainer(recipe, model, tok, sft_rows(recipe, data.splits["train"]), [], placement,
                            Path(out), save_strategy="no")
    trainer.train()
    assert trainer.args.world_size == 2 and trainer.accelerator.num_processes == 2
    weights = {n: p.detach().contiguous() for n, p in model.named_parameters() if "lora_" in n}
    save_file(weights, os.path.join(out, f"rank{rank}.safetensors"))
    backend = torch.distributed.get_backend()
    print(f"rank {rank} backend {backend} steps {trainer.state.global_step}", flush=True)
""")



def test_two_gloo_ranks_agree_on_the_final_weights(tmp_path, tiny_model_dir):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")

    import csv

    with open(tmp_path / "rows.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "category"])
        writer.writeheader()
        writer.writerows({"text": r["text"], "category": r["category"]} for r in banking_rows(("card_arrival", "pin_blocked"), 12))
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TUNESMITH_DATA_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            str(tmp_path / "worker.py"),
            str(tiny_model_dir),
            str(tmp_path / "rows.csv"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0 prepared 20 examples" in proc.stdout and "rank 1 prepared 20 examples" in proc.stdout
    assert proc.stdout.count("prepared data from the cache") == 1  # rank 1 waited for rank 0's build
    assert "rank 0 backend gloo steps 3" in proc.stdout and "rank 1 backend gloo steps 3" in proc.stdout
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert set(r0) == set(r1) and len(r0) == 28
    for key in r0:
        torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=1e-6)
    assert any(not torch.equal(r0[k], torch.zeros_like(r0[k])) for k in r0 if "lora_B" in k)  # it trained
