"""``tunesmith train``: the data stage, then training alone (no evaluation), for any method."""

from __future__ import annotations

from rich.console import Console

from tunesmith.config import Recipe, dump_resolved
from tunesmith.distributed import finish, is_main, main_process_first, prepare_data_once
from tunesmith.errors import ConfigError
from tunesmith.progress import task_bar

__all__ = ["main_process_first", "run_training"]


def run_training(recipe: Recipe, console: Console, resume: bool = False):
    """Prepare data (unless DPO reads its pairs alone), then train through the one dispatcher. Under
    torchrun the data stage runs once (rank 0) and only rank 0 writes into the run folder."""
    from tunesmith.models.loading import check_adapter_device, pick_placement
    from tunesmith.train.dispatch import TrainData, train

    if recipe.data is None and recipe.train.method != "dpo":
        raise ConfigError("data: required (only train.method dpo reads its pairs from train.dpo.path)")
    placement = pick_placement(recipe.model.precision, recipe.model.device)
    check_adapter_device(recipe.train.adapter, placement)
    run_dir = recipe.run_dir
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_resolved(recipe, run_dir / "config.resolved.yaml")
    data = TrainData()
    if recipe.data is not None:
        prepared = prepare_data_once(recipe, run_dir / "data", console)
        console.print(", ".join(f"{k}: {v}" for k, v in prepared.summary.items()))
        data = TrainData(prepared.splits["train"], prepared.splits["val"], prepared.labels)
    result = train(recipe, data, console, lambda desc, total: task_bar(console, desc, total), resume=resume)
    finish()
    return result
