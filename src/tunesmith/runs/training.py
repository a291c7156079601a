"""``tunesmith train``: the data stage, then training alone (no evaluation), for any method.

Training goes through :func:`tunesmith.runs.once.train_once`, as each arm of ``tunesmith run`` does: a
training finished before with the same settings is not retrained, checkpoints of other settings are removed,
those of the same settings are resumed, and ``train/done.json`` keeps the summary printed at the end.
"""

from __future__ import annotations

from rich.console import Console

from tunesmith.config import Recipe, dump_resolved
from tunesmith.errors import ConfigError
from tunesmith.machine.launch import finish, is_main, main_process_first
from tunesmith.progress import task_bar
from tunesmith.runs.data import prepare_data_once

__all__ = ["main_process_first", "print_summary", "run_training"]


def run_training(recipe: Recipe, console: Console, resume: bool = False):
    """Prepare data (unless DPO reads its pairs alone), then train once per settings; ``resume`` insists on
    continuing from the newest checkpoint (see :mod:`tunesmith.runs.once`). Under torchrun the data stage
    runs once (rank 0) and only rank 0 writes into the run folder. Returns a
    :class:`~tunesmith.runs.once.Trained`."""
    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.loading import check_adapter_device
    from tunesmith.runs.once import train_once
    from tunesmith.train.jobs import TrainData

    if recipe.data is None and not recipe.train.spec.reads_pairs:
        raise ConfigError("data: required (only train.method dpo reads its pairs from train.dpo.path)")
    recipe.refuse_folds("tunesmith train")
    placement = pick_placement(recipe.model.precision, recipe.model.device)
    check_adapter_device(recipe.train.adapter, placement)
    run_dir = recipe.run_dir
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_resolved(recipe, run_dir / "config.resolved.yaml")
    if recipe.synth is not None:  # what trains here is the recipe without it, and its fingerprint says so
        console.print("[yellow]synth: the synth stage runs in `tunesmith run` (or alone: `tunesmith synth`); "
                      "this trains on the prepared split only[/]")
        recipe = recipe.model_copy(update={"synth": None})
    data = TrainData()
    if recipe.data is not None:
        prepared = prepare_data_once(recipe, run_dir / "data", console)
        console.print(", ".join(f"{k}: {v}" for k, v in prepared.summary.items()))
        data = TrainData(prepared.splits["train"], prepared.splits["val"], prepared.labels)
    trained = train_once(recipe, data, console, lambda desc, total: task_bar(console, desc, total),
                         name=recipe.name, resume=resume)
    finish()
    print_summary(trained.summary, console)
    return trained


def print_summary(summary: dict, console: Console) -> None:
    """The training summary as a two-column table (the rows the run's report shows under "Training")."""
    from rich.table import Table

    table = Table(title="training summary", show_header=False)
    for key, value in summary.items():
        table.add_row(str(key), str(value))
    console.print(table)
