"""One training entry point for every caller (``tunesmith train``, ``tunesmith run`` and its arms,
the jobs worker) and every method (generative SFT, DPO, classifier, regression and span heads).

The caller hands over examples (or ready chat rows); this module orders the train split, sets
aside examples that do not fit ``train.max_seq_length``, fits the micro-batch to the memory the
machine has, loads and wraps the model, trains, and writes ``train/metrics.csv``, ``loss.png`` and
``summary.json``. Every method returns the same :class:`~tunesmith.train.result.TrainResult`.

Which code trains is looked up by ``(train.method, train.head)`` among the trainers registered here
with :func:`trainer`; adding a method is a trainer module in ``train/`` and one registered function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from tunesmith.config import Recipe
from tunesmith.errors import ConfigError
from tunesmith.records import Example
from tunesmith.train.result import TrainResult, write_outputs


@dataclass
class TrainData:
    """What to train on: examples of the recipe's task (formatted with the recipe's data section),
    or chat rows as uploaded (prompt/completion messages) for fine-tuning jobs."""

    train: list[Example] = field(default_factory=list)
    val: list[Example] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    rows: list[dict] | None = None
    val_rows: list[dict] | None = None


# tracker -> (module to import, extra that installs it, env var for a local store, folder under train/)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard", "TENSORBOARD_LOGGING_DIR", "tensorboard"),
            "trackio": ("trackio", "trackio", "TRACKIO_DIR", "trackio"),
            "mlflow": ("mlflow", "mlflow", "MLFLOW_TRACKING_URI", "mlruns"),
            "wandb": ("wandb", "wandb", "WANDB_DIR", "wandb")}


_TRACKER_DIRS: dict[str, str] = {}  # the values we set, so that the next run (or arm) gets its own folder


def prepare_trackers(report_to: list[str], out_dir: Path, console: Console) -> None:
    """Check each ``train.report_to`` tracker is installed and, unless the user's environment says
    otherwise, point its local store into the run's train folder (offline, next to metrics.csv)."""
    import importlib.util
    import os

    for name in report_to:
        module, extra, env, folder = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.report_to: {name} is not installed; pip install 'tunesmith[{extra}]' "
                              f"(or remove it from report_to)")
        if os.environ.get(env) in (None, _TRACKER_DIRS.get(env)):  # not the user's own setting: this run's folder
            where = out_dir.resolve() / folder
            os.environ[env] = _TRACKER_DIRS[env] = where.as_uri() if name == "mlflow" else str(where)
        console.print(f"{name}: logging to {os.environ[env]}")


def train(recipe: Recipe, data: TrainData, console: Console, bar, *, resume: bool | Path = False,
          callbacks: list | None = None, init_adapter: Path | None = None, init_merged: bool = False) -> TrainResult:
    """Train as the recipe says and write the train folder; ``init_adapter`` continues from a saved adapter (with
    ``init_merged``, merged into the base first and a new adapter trained on the merged model)."""
    from tunesmith.machine.path import take_path
    from tunesmith.models.loading import load_tokenizer

    recipe = decided_length(recipe, console)
    recipe, path, placement = take_path(recipe, data.rows)
    console.print(f"training path: {path.describe()}")
    if path.reasons.get("micro_batch"):
        console.print(f"[yellow]memory: {path.reasons['micro_batch']}[/]")
    tokenizer = load_tokenizer(recipe.model.name)
    out_dir = recipe.run_dir / "train"
    prepare_trackers(recipe.train.report_to, out_dir, console)
    job = TrainJob(recipe, data, tokenizer, placement, console, bar, resume, callbacks, init_adapter, init_merged)
    result = trainer_for(recipe.train.method, recipe.train.head, path.name)(job)
    from tunesmith.machine.launch import is_main
    from tunesmith.models.random_weights import is_random

    result.train_path = path.to_json()
    result.random_weights = recipe.model.name if is_random(recipe.model.name) else None
    if is_main():  # one writer under torchrun
        write_outputs(result, out_dir, f"{recipe.name}: loss")
    console.print(
        f"trained {result.trainable_params:,} of {result.total_params:,} parameters on {result.tokens:,} tokens in "
        f"{result.seconds:.0f}s ({result.tokens_per_second:,.0f} tok/s, peak {result.peak_memory_mb:,.0f} MB) "
        f"→ {result.output_dir}"
    )
    return result


def decided_length(recipe: Recipe, console: Console) -> Recipe:
    """``max_seq_length: auto`` that reached training undecided (a caller that did not fit the recipe to its
    examples, as ``tunesmith run`` and ``train`` do): the unmeasured default, said."""
    from tunesmith.config import UNMEASURED_LENGTH

    if recipe.train.max_seq_length != "auto":
        return recipe
    console.print(f"train.max_seq_length: auto → {UNMEASURED_LENGTH} (not measured on these examples)")
    return recipe.with_train(max_seq_length=UNMEASURED_LENGTH)


@dataclass
class TrainJob:
    """What every trainer is handed: the recipe resolved for this machine and what to train on."""

    recipe: Recipe
    data: TrainData
    tokenizer: object
    placement: object  # tunesmith.machine.placement.Placement
    console: Console
    bar: object
    resume: bool | Path = False  # True: the newest checkpoint of the run's folder; a folder: that checkpoint
    callbacks: list | None = None
    init_adapter: Path | None = None
    init_merged: bool = False  # init_adapter merged into the base weights (a method whose reference is the start)


Trainer = Callable[[TrainJob], TrainResult]
_TRAINERS: dict[tuple[str, str, str], Trainer] = {}


def trainer(method: str, *heads: str, path: str = "fast"):
    """Function decorator: train ``(method, head)`` recipes, for each of ``heads``, with ``fn(job)`` on training path
    ``path`` (``fast``, tunesmith's trainers, or ``reference``, plain TRL / transformers)."""
    def add(fn: Trainer) -> Trainer:
        for head in heads:
            if (method, head, path) in _TRAINERS:
                raise ValueError(f"a trainer for method {method} with head {head} on path {path} is registered twice")
            _TRAINERS[(method, head, path)] = fn
        return fn

    return add


def trainer_for(method: str, head: str, path: str = "fast") -> Trainer:
    if (method, head, path) not in _TRAINERS:
        known = ", ".join(f"{m} with head {h}" for m, h, p in sorted(_TRAINERS) if p == path)
        where = "" if path == "fast" else f" on train.path {path}"
        raise ConfigError(f"train.method {method} with train.head {head}{where}: nothing trains that; known: {known}")
    return _TRAINERS[(method, head, path)]


def generative_model(job: TrainJob):
    """The base model with the recipe's adapter (continuing from ``init_adapter`` when given), announced."""
    r, placement = job.recipe, job.placement
    model = load_base(r, placement, job.init_adapter, job.init_merged)
    start = f", from {job.init_adapter}" + (" (merged)" if job.init_merged else "") if job.init_adapter else ""
    job.console.print(f"{r.model.name} on {placement.device} in {placement.dtype}, adapter {r.train.adapter}{start}")
    return model


def load_base(recipe: Recipe, placement, init_adapter: Path | None, merged: bool = False):
    """The base model for the recipe's adapter; with ``init_adapter``, that adapter on it, trainable, or (with
    ``merged``) merged into its weights, so that a new adapter trains on the model it made."""
    from tunesmith.models.loading import load_model_for

    model = load_model_for(recipe.model.name, placement, recipe.train.adapter)
    if init_adapter is None:
        return model
    from peft import PeftModel

    if merged:
        if recipe.train.adapter == "qlora":
            raise ConfigError("an adapter cannot be merged into 4-bit weights: continue this method with LoRA")
        return PeftModel.from_pretrained(model, str(init_adapter)).merge_and_unload()
    return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)


def ordered(recipe: Recipe, train: list[Example]) -> list[Example]:
    from tunesmith.data.steps.examples import order_train

    return order_train(train, recipe.data) if recipe.data is not None else train
