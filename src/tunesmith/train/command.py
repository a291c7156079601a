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
    """Prepare data, load the model for the adapter, train; returns the stage's result object."""
    from tunesmith.models.loading import check_adapter_device, load_model_for, load_tokenizer, pick_placement
    from tunesmith.pipeline import prepare_data

    if recipe.data is None and recipe.train.method != "dpo":
        raise ConfigError("data: required (only train.method dpo reads its pairs from train.dpo.path)")
    placement = pick_placement(recipe.model.precision, recipe.model.device)
    check_adapter_device(recipe.train.adapter, placement)  # before any data or model work
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_resolved(recipe, run_dir / "config.resolved.yaml")

    def bar(desc: str, total: int):
        return task_bar(console, desc, total)

    tokenizer = load_tokenizer(recipe.model.name)
    if recipe.train.method == "dpo":
        from tunesmith.train.dpo import train_dpo

        model = load_model_for(recipe.model.name, placement, recipe.train.adapter)
        return train_dpo(recipe, model, tokenizer, placement, console, bar, resume=resume)
    with main_process_first():  # under torchrun/accelerate, rank 0 builds (and caches) the data first
        data = prepare_data(recipe, run_dir / "data", console)
    console.print(", ".join(f"{k}: {v}" for k, v in data.summary.items()))
    if recipe.train.head == "classifier":
        from tunesmith.train.classifier import train_classifier

        return train_classifier(recipe, data, tokenizer, placement, console, bar, resume=resume)
    from tunesmith.train.stage import train_stage

    model = load_model_for(recipe.model.name, placement, recipe.train.adapter)
    console.print(
        f"{recipe.model.name} on {placement.device} in {placement.dtype}, adapter {recipe.train.adapter}"
    )
    return train_stage(
        recipe,
        data.splits["train"],
        data.splits["val"],
        model,
        tokenizer,
        placement,
        console,
        bar,
        resume=resume,
    )
