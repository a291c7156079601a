"""``tunesmith run``: data → (synth) → for each arm: train → one evaluation of every contender → one report.

This module only wires the stages together: data preparation (:mod:`tunesmith.data.prepare`),
synthetic augmentation (:mod:`tunesmith.synth.augment`), training (:mod:`tunesmith.train.once`, the path
``tunesmith train`` takes too) and evaluation (:mod:`tunesmith.eval.runner`, the path ``tunesmith eval``
takes too).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from tunesmith.config import Recipe, dump_resolved
from tunesmith.errors import ConfigError


@dataclass
class RunResult:
    run_dir: Path
    report: Path
    metrics: dict
    headline: str
    timings: dict[str, float] = field(default_factory=dict)


def run(recipe: Recipe, console: Console | None = None, command: str = "") -> RunResult | None:
    """Run the whole recipe and return where its report is; ``command`` (how it was started) goes in
    ``command.txt`` for the results table. Under torchrun every rank trains, rank 0 alone writes the run
    folder, evaluates and reports; the other ranks return None once training is done."""
    from tunesmith.distributed import finish, is_main, prepare_data_once
    from tunesmith.eval.runner import arm_name, arm_recipes, check_endpoints, contenders_of, evaluate

    console = console or Console()
    if recipe.data is None:
        raise ConfigError("this recipe has no data section; `tunesmith run` needs one (see examples/banking77.yaml)")
    check_endpoints(recipe)  # a missing API key fails before any data or model work
    if recipe.hosted is not None:
        console.print("[yellow]hosted: used by `tunesmith train --backend openai` only; this run trains locally[/]")
    run_dir = recipe.run_dir
    main = is_main()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_resolved(recipe, run_dir / "config.resolved.yaml")
        if command:
            (run_dir / "command.txt").write_text(command + "\n", encoding="utf-8")
    timings: dict[str, float] = {}

    @contextmanager
    def stage(name: str):
        console.rule(f"[bold]{name}")
        t0 = time.time()
        yield
        timings[name] = round(time.time() - t0, 1)
        if main:
            (run_dir / "timings.json").write_text(json.dumps(timings, indent=2), encoding="utf-8")

    with stage("data"):
        data = prepare_data_once(recipe, run_dir / "data", console)
        console.print(", ".join(f"{k}: {v}" for k, v in data.summary.items()))
    arms = arm_recipes(recipe)
    trained = {}
    for i, arm in enumerate(arms, 1):
        name = arm_name(recipe, arm)
        with stage(f"arm {i}/{len(arms)}: {name}"):
            trained[name] = train_arm(recipe, arm, name, data, console, f"[{i}/{len(arms)} {name}] ")
    finish()
    if not main:
        return None
    with stage("evaluate"):
        ev = evaluate(recipe, data.splits["train"], data.splits["test"], data.labels, contenders_of(recipe, console),
                      data.summary, console)
    with stage("report"):
        report = write_run_report(recipe, ev, trained, timings)
    return RunResult(run_dir, report, {r.name: r.metrics for r in ev.results}, ev.report.headline(), timings)


def train_arm(recipe: Recipe, arm: Recipe, name: str, data, console: Console, prefix: str) -> dict:
    """Train one arm through :func:`tunesmith.train.once.train_once` (not retrained when it finished before with
    the same settings); when it trains, its data exports and its synth stage come first. Returns its summary."""
    from tunesmith.progress import task_bar
    from tunesmith.train.dispatch import TrainData
    from tunesmith.train.once import from_arm_adapter, train_once

    def before_training(arm: Recipe, train: list):
        _export_arm(recipe, arm, data.splits, train)
        if arm.synth is None:
            return None
        from tunesmith.synth.augment import augment

        return augment(arm, recipe, train, data.splits["val"] + data.splits["test"], console)

    trained = train_once(arm, TrainData(data.splits["train"], data.splits["val"], data.labels), console,
                         lambda desc, total: task_bar(console, prefix + desc, total), name=name,
                         before=before_training, init_adapter=from_arm_adapter(recipe, name),
                         base_model=recipe.model.name)
    return trained.summary


def _export_arm(recipe: Recipe, arm: Recipe, splits: dict, train: list) -> None:
    """An arm's splits as it formats them (system prompt, order) in ``arms/<arm>/data/export`` (rank 0 only)."""
    from tunesmith.distributed import is_main

    if arm is recipe or not arm.data.export or not is_main():
        return
    from tunesmith.data.exporters import export_splits
    from tunesmith.train.dispatch import ordered

    export_splits({**splits, "train": ordered(arm, train)}, arm.data, arm.run_dir / "data" / "export")


def write_run_report(recipe: Recipe, ev, trained: dict[str, dict], timings: dict[str, float]) -> Path:
    """The run's report.md: the evaluation report plus each arm's training and the time per stage."""
    report = ev.report
    report.title = f"{recipe.name}: fine-tuning report"
    report.sections = {f"Training: {name}": summary for name, summary in trained.items()}
    report.sections["Time per stage (seconds)"] = timings
    add_train_seconds(recipe, report.results)
    images = dict(report.images)
    for arm_dir, name in _arm_dirs(recipe):
        if (arm_dir / "train" / "loss.png").is_file():
            images[f"Training loss: {name}"] = arm_dir / "train" / "loss.png"
    for png in sorted((recipe.run_dir / "data" / "profile").glob("*.png")):
        images[f"Data profile: {png.stem.replace('_', ' ')}"] = png
    report.images = images
    path = recipe.run_dir / "report.md"
    path.write_text(report.markdown(recipe.run_dir), encoding="utf-8")
    (recipe.run_dir / "report.html").write_text(report.html(), encoding="utf-8")
    return path


def add_train_seconds(recipe: Recipe, results: list) -> None:
    """Each trained arm's training time (its train/summary.json) in its metrics, for the comparison table."""
    by_name = {r.name: r for r in results}
    for arm_dir, name in _arm_dirs(recipe):
        summary = arm_dir / "train" / "summary.json"
        if name in by_name and summary.is_file():
            by_name[name].metrics["train_seconds"] = json.loads(summary.read_text(encoding="utf-8"))["seconds"]


def _arm_dirs(recipe: Recipe) -> list[tuple[Path, str]]:
    from tunesmith.eval.runner import arm_name, arm_recipes

    return [(a.run_dir, arm_name(recipe, a)) for a in arm_recipes(recipe)]
