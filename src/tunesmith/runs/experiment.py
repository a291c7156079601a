"""``tunesmith run``: data → (synth) → for each arm: train → one evaluation of every contender → one report.

This module only wires the stages together: data preparation (:mod:`tunesmith.data.prepare`),
synthetic augmentation (:mod:`tunesmith.synth.augment`), training (:mod:`tunesmith.runs.once`, the path
``tunesmith train`` takes too) and evaluation (:mod:`tunesmith.eval.runner`, the path ``tunesmith eval``
takes too).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
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
    from tunesmith.eval.runner import arm_name, arm_recipes, check_endpoints, contenders_of, evaluate
    from tunesmith.machine.launch import finish, is_main
    from tunesmith.runs.data import prepare_data_once

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
    if recipe.data.split.folds:
        return run_folds(recipe, data, console, stage, timings)
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
        contenders = contenders_of(recipe, console)
        ev = evaluate(recipe, data.splits["train"], data.splits["test"], data.labels, contenders, data.summary, console)
        ev.report.recommended = recommend_on_validation(recipe, ev.task, contenders, data.splits["val"], console)
        from tunesmith.eval.headline import save

        save(ev.eval_dir, ev.task, ev.report.recommended)
    with stage("report"):
        report = write_run_report(recipe, ev, trained, timings)
    return RunResult(run_dir, report, {r.name: r.metrics for r in ev.results}, ev.report.headline(), timings)


def recommend_on_validation(recipe: Recipe, task, contenders: list, val: list, console: Console):
    """``(arm, why)``: with two or more fine-tuned contenders, the best on the validation split (a seeded sample
    of ``eval.max_examples``), so that the arm the report recommends is not chosen on the test split it reports.
    None with one arm, or without a validation split (then no arm is recommended, and the run says so)."""
    from tunesmith.data.steps.split import sample_examples
    from tunesmith.eval.headline import recommend
    from tunesmith.eval.runner import evaluate_local
    from tunesmith.progress import task_bar

    tuned = [c for c in contenders if c.name != "base"]
    if len(tuned) < 2:
        return None
    if not recipe.eval.recommend:
        console.print("eval.recommend: false: no arm is scored on the validation split, none recommended")
        return None
    if not val:
        console.print("[yellow]no validation split: no arm is recommended (give data.split.val a size > 0)[/]")
        return None
    val, _ = sample_examples(val, recipe.eval.max_examples, task.stratify, recipe.seed)
    bar = lambda d, t: task_bar(console, d.replace("eval ", "validation: "), t)  # noqa: E731
    return recommend(task, [evaluate_local(recipe, task, c, val, bar) for c in tuned])


def run_folds(recipe: Recipe, data, console: Console, stage, timings: dict) -> RunResult | None:
    """Cross-validation (``data.split.folds``): every arm trains once per fold under ``folds/fold-<i>/``, every
    contender answers the fold it did not train on, and one evaluation pools all folds (eval/folds.py)."""
    from tunesmith.eval.folds import fold_table, pool_results
    from tunesmith.eval.runner import arm_name, arm_recipes, contenders_of, finish_evaluation, score_contenders
    from tunesmith.machine.launch import finish, is_main

    folds = cross_validation_splits(recipe, data)
    k, trained = len(folds), {}
    for i, splits in enumerate(folds, 1):
        fold = fold_recipe(recipe, i)
        arms = arm_recipes(fold)
        for j, arm in enumerate(arms, 1):
            name = arm_name(fold, arm)
            with stage(f"arm {j}/{len(arms)}: {name}, fold {i}/{k}"):
                summary = train_arm(fold, arm, name, replace(data, splits=splits), console,
                                    f"[fold {i}/{k} · {j}/{len(arms)} {name}] ")
            trained.setdefault(name, []).append(summary)
    finish()
    if not is_main():
        return None
    with stage("evaluate"):
        parts = []
        for i, splits in enumerate(folds, 1):
            console.rule(f"fold {i}/{k}")
            fold = fold_recipe(recipe, i)
            task, test, _, results = score_contenders(fold, splits["train"], splits["test"], data.labels,
                                                      contenders_of(fold, console), console)
            parts.append((test, results))
        test, pooled = pool_results(task, parts)
        seconds = train_seconds_by_arm(recipe)  # summed over the folds
        for r in pooled:
            r.metrics["train_seconds"] = seconds.get(r.name)
        ev = finish_evaluation(recipe, task, pooled, test, fold_summary(data.summary, folds, len(test)), console)
    with stage("report"):
        report = write_run_report(recipe, ev, {n: merged_summary(s) for n, s in trained.items()}, timings,
                                  {"Headline per fold": fold_table(task, parts)})
    return RunResult(recipe.run_dir, report, {r.name: r.metrics for r in pooled}, ev.report.headline(), timings)


def cross_validation_splits(recipe: Recipe, data) -> list[dict]:
    """The ``data.split.folds`` splits of every prepared example (stratified only where the task kind is)."""
    from tunesmith.data.steps.split import fold_splits
    from tunesmith.kinds import kind_class

    examples = [e for part in ("train", "val", "test", "unused") for e in data.splits.get(part, [])]
    cfg = recipe.data.split
    cfg = cfg.model_copy(update={"stratify": kind_class(recipe.data.task).stratify and cfg.stratify})
    return fold_splits(examples, cfg, recipe.seed)


def fold_recipe(recipe: Recipe, i: int) -> Recipe:
    """Fold ``i``'s recipe: the same settings, its run folder ``<run>/folds/fold-<i>``."""
    return recipe.model_copy(update={"output_dir": recipe.run_dir / "folds", "name": f"fold-{i}"})


def fold_summary(summary: dict, folds: list[dict], scored: int) -> dict:
    """The data table under cross-validation: split sizes per fold instead of the one split's."""
    out = {k: v for k, v in summary.items() if k not in ("train", "val", "test", "not used (split sizes smaller "
                                                                                    "than the data)")}

    def sizes(part: str) -> str:
        n = sorted(len(f[part]) for f in folds)
        return f"{n[0]:,}" if n[0] == n[-1] else f"{n[0]:,}–{n[-1]:,}"

    out["cross-validation"] = f"{len(folds)} folds: each example tested once, by models that did not train on it"
    out |= {"train (per fold)": sizes("train"), "val (per fold)": sizes("val"), "test (per fold)": sizes("test"),
            "test examples scored": f"all {scored:,}, over {len(folds)} folds"}
    return out


def merged_summary(per_fold: list[dict]) -> dict:
    """One training table for an arm trained once per fold: a value the folds share once, the others per fold."""
    out = {}
    for key in per_fold[0]:
        values = [str(s.get(key, "–")) for s in per_fold]
        out[key] = values[0] if len(set(values)) == 1 else "per fold: " + " · ".join(values)
    return out


def train_arm(recipe: Recipe, arm: Recipe, name: str, data, console: Console, prefix: str) -> dict:
    """Train one arm through :func:`tunesmith.runs.once.train_once` (not retrained when it finished before with
    the same settings); when it trains, its data exports and its synth stage come first. Returns its summary."""
    from tunesmith.progress import task_bar
    from tunesmith.runs.once import from_arm_adapter, train_once
    from tunesmith.train.jobs import TrainData

    def before_training(arm: Recipe, train: list):
        _export_arm(recipe, arm, data.splits, train)
        if arm.synth is None:
            return None
        from tunesmith.synth.stage import augment

        return augment(arm, recipe, train, data.splits["val"] + data.splits["test"], console)

    trained = train_once(arm, TrainData(data.splits["train"], data.splits["val"], data.labels), console,
                         lambda desc, total: task_bar(console, prefix + desc, total), name=name,
                         before=before_training, init_adapter=from_arm_adapter(recipe, name),
                         base_model=recipe.model.name)
    return trained.summary


def _export_arm(recipe: Recipe, arm: Recipe, splits: dict, train: list) -> None:
    """An arm's splits as it formats them (system prompt, order) in ``arms/<arm>/data/export`` (rank 0 only)."""
    from tunesmith.machine.launch import is_main

    if arm is recipe or not arm.data.export or not is_main():
        return
    from tunesmith.data.formats.exporters import export_splits
    from tunesmith.train.jobs import ordered

    export_splits({**splits, "train": ordered(arm, train)}, arm.data, arm.run_dir / "data" / "export")


def write_run_report(recipe: Recipe, ev, trained: dict[str, dict], timings: dict[str, float],
                     extra: dict[str, dict] | None = None) -> Path:
    """The run's report.md: the evaluation report plus each arm's training and the time per stage."""
    report = ev.report
    report.title = f"{recipe.name}: fine-tuning report"
    report.sections = {**(extra or {}), **{f"Training: {name}": summary for name, summary in trained.items()}}
    report.sections["Time per stage (seconds)"] = timings
    report.sections["Peak memory (MB)"] = run_peak_memory(recipe)
    if not recipe.data.split.folds:  # under cross-validation the pooled results carry the sum over folds
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


def arm_summaries(recipe: Recipe) -> list[tuple[str, int, dict]]:
    """``(arm name, fold, its train/summary.json)`` of every arm that finished training — fold 0 outside
    cross-validation, else once per fold — so that an arm reused from an earlier run counts too."""
    k = recipe.data.split.folds or 0
    tops = [(fold_recipe(recipe, i), i) for i in range(1, k + 1)] if k else [(recipe, 0)]
    out = []
    for top, fold in tops:
        for arm_dir, name in _arm_dirs(top):
            path = arm_dir / "train" / "summary.json"
            if path.is_file():
                out.append((name, fold, json.loads(path.read_text(encoding="utf-8"))))
    return out


def train_seconds_by_arm(recipe: Recipe) -> dict[str, float]:
    """Each trained arm's training time, summed over the folds under cross-validation."""
    seconds: dict[str, float] = {}
    for name, _, summary in arm_summaries(recipe):
        seconds[name] = seconds.get(name, 0.0) + summary["seconds"]
    return seconds


def run_peak_memory(recipe: Recipe) -> dict[str, float]:
    """The run's peak memory: the largest of each arm's training peak (see :func:`arm_summaries`) and this
    process's own peak, evaluation included. Written to memory.json too."""
    from tunesmith.train.trainer import process_peak_memory_mb

    training = {f"training: {name}" + (f", fold {fold}" if fold else ""): round(summary["peak_memory_mb"])
                for name, fold, summary in arm_summaries(recipe) if summary.get("peak_memory_mb")}
    process = round(process_peak_memory_mb())
    peaks = {"the run (largest below)": max([process, *training.values()]),
             "this process, evaluation included": process, **training}
    (recipe.run_dir / "memory.json").write_text(json.dumps(peaks, indent=2), encoding="utf-8")
    return peaks


def add_train_seconds(recipe: Recipe, results: list) -> None:
    """Each trained arm's training time (its train/summary.json) in its metrics, for the comparison table."""
    seconds = train_seconds_by_arm(recipe)
    for r in results:
        if r.name in seconds:
            r.metrics["train_seconds"] = seconds[r.name]


def _arm_dirs(recipe: Recipe) -> list[tuple[Path, str]]:
    from tunesmith.eval.runner import arm_name, arm_recipes

    return [(a.run_dir, arm_name(recipe, a)) for a in arm_recipes(recipe)]
