"""``tunesmith train``: the data stage, then training alone (no evaluation), for any method."""

from __future__ import annotations

import os
from contextlib import contextmanager

from rich.console import Console

from tunesmith.config import Recipe, dump_resolved
from tunesmith.errors import ConfigError
from tunesmith.progress import task_bar


@contextmanager
def main_process_first():
    """In a multi-process launch (torchrun, accelerate), rank 0 runs the block first and the other ranks
    after it (they then find its cached data instead of writing the same files at the same time)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():  # the Trainer reuses this process group
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per rank, as the Trainer does
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    main = dist.get_rank() == 0
    if not main:
        dist.barrier()
    yield
    if main:
        dist.barrier()


def run_training(recipe: Recipe, console: Console, resume: bool = False):
    """Prepare data (unless DPO reads its pairs alone), then train through the one dispatcher."""
    from tunesmith.data.prepare import prepare
    from tunesmith.models.loading import check_adapter_device, pick_placement
    from tunesmith.train.dispatch import TrainData, train

    if recipe.data is None and recipe.train.method != "dpo":
        raise ConfigError("data: required (only train.method dpo reads its pairs from train.dpo.path)")
    check_adapter_device(recipe.train.adapter, pick_placement(recipe.model.precision, recipe.model.device))
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_resolved(recipe, run_dir / "config.resolved.yaml")
    data = TrainData()
    if recipe.data is not None:
        with main_process_first():  # under torchrun/accelerate, rank 0 builds (and caches) the data first
            prepared = prepare(recipe, run_dir / "data", console)
        console.print(", ".join(f"{k}: {v}" for k, v in prepared.summary.items()))
        data = TrainData(prepared.splits["train"], prepared.splits["val"], prepared.labels)
    return train(recipe, data, console, lambda desc, total: task_bar(console, desc, total), resume=resume)
