"""``tunesmith run``: data → (synth) → for each arm: train → one evaluation of every contender → one report.

This module only wires the stages together: data preparation (:mod:`tunesmith.data.prepare`),
synthetic augmentation (:mod:`tunesmith.synth.augment`), training (:mod:`tunesmith.train.dispatch`) and
evaluation (:mod:`tunesmith.eval.runner`, the path ``tunesmith eval`` takes too).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from tunesmith.config import Recipe, dump_resolved
from tunesmith.errors import ConfigError, DataError


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
    """Train one arm unless it finished before with the same settings (``train/done.json``); returns its summary."""
    from tunesmith.distributed import is_main, main_process_first
    from tunesmith.progress import task_bar
    from tunesmith.train.dispatch import TrainData, train

    with main_process_first():  # rank 0 decides about earlier checkpoints and runs any synth stage first
        plan = _plan_arm(recipe, arm, name, data, console)
    if isinstance(plan, dict):
        return plan
    arm, train_set, summary, resume, key = plan
    init = _from_arm(recipe, name)
    result = train(arm, TrainData(train_set, data.splits["val"], data.labels), console,
                   lambda desc, total: task_bar(console, prefix + desc, total), resume=resume, init_adapter=init)
    t = arm.train
    summary |= {
        "method": f"{t.method} / {t.adapter}" + (f" r={t.lora.r}" if t.adapter != "full" else "")
                  + (f" / {t.head} head" if t.head != "generative" else "")
                  + (f" on {arm.model.name}" if arm.model.name != recipe.model.name else ""),
        "epochs / learning rate": f"{t.epochs:g} / {t.learning_rate:g}",
        "training examples (set aside as too long)": f"{result.examples:,} ({result.too_long:,})",
        "trainable parameters": f"{result.trainable_params:,} of {result.total_params:,}",
        "tokens trained": f"{result.tokens:,}",
        "training time": f"{result.seconds:.0f} s ({result.tokens_per_second:,.0f} tokens/s)",
        "peak memory": f"{result.peak_memory_mb:,.0f} MB",
        "train loss first → last": _loss_span(result.rows),
        "trainable tensors that changed": f"{result.tensors_changed} of {result.tensors_trainable}",
        "training path": _path_line(result.train_path),
    }
    if is_main():
        (arm.run_dir / "train" / "done.json").write_text(json.dumps({"fingerprint": key, "summary": summary}, indent=2),
                                                         encoding="utf-8")
    return summary


def _plan_arm(recipe: Recipe, arm: Recipe, name: str, data, console: Console):
    """Before an arm trains: its summary when it finished before with the same settings; else the arm (with
    any synth stage's pairs), its training examples, the summary so far, whether to resume and its fingerprint.
    Only rank 0 writes (exports, the settings of the checkpoints, removal of stale ones)."""
    from tunesmith.distributed import is_main
    from tunesmith.train.resume import complete_checkpoint

    main = is_main()
    out = arm.run_dir / "train"
    key = arm_fingerprint(arm, data)
    done = out / "done.json"
    if done.is_file() and json.loads(done.read_text()).get("fingerprint") == key:
        console.print(f"{name}: trained before with the same settings ({done}); not retrained")
        return json.loads(done.read_text())["summary"]
    train_set = list(data.splits["train"])
    summary: dict = {}
    if arm is not recipe and arm.data.export and main:  # each arm's splits as it formats them (system prompt, order)
        from tunesmith.data.exporters import export_splits
        from tunesmith.train.dispatch import ordered

        splits = {**data.splits, "train": ordered(arm, train_set)}
        export_splits(splits, arm.data, arm.run_dir / "data" / "export")
    if arm.synth is not None:
        from tunesmith.synth.augment import augment

        grown = augment(arm, recipe, train_set, data.splits["val"] + data.splits["test"], console)
        train_set += grown.examples
        summary |= grown.summary
        if grown.dpo_pairs is not None:
            t = arm.train
            arm = arm.model_copy(update={"train": t.model_copy(update={"dpo": t.dpo.model_copy(update={"path": grown.dpo_pairs})})})
    if not train_set and arm.train.method != "dpo":
        raise DataError(f"{name}: no training examples (the train split is empty and no synth stage added any)")
    started = out / "started.json"  # which settings the checkpoints below belong to
    checkpoint = complete_checkpoint(out / "checkpoints")
    if checkpoint and (not started.is_file() or json.loads(started.read_text()).get("fingerprint") != key):
        console.print(f"[yellow]{name}: the checkpoints in {out / 'checkpoints'} were made with other settings; "
                      "training from scratch[/]")
        if main:
            shutil.rmtree(out / "checkpoints")
        checkpoint = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        started.write_text(json.dumps({"fingerprint": key}), encoding="utf-8")
    if checkpoint is not None:
        console.print(f"{name}: resuming from {checkpoint}")
    return arm, train_set, summary, checkpoint is not None, key


def _path_line(path: dict | None) -> str:
    """The chosen training path in one line (device, dtype, attention, packing, optimizer, kernels, ...)."""
    from tunesmith.train.device import TrainPath

    return TrainPath(**path).describe() if path else "–"


def _from_arm(recipe: Recipe, name: str) -> Path | None:
    """The adapter an arm starts from (``from_arm``), which must have been trained first."""
    from tunesmith.config import arm_recipe
    from tunesmith.train.result import Artefact, trained_output

    spec = next((a for a in recipe.arms if a.name == name), None)
    if spec is None or not spec.from_arm:
        return None
    source = arm_recipe(recipe, next(a for a in recipe.arms if a.name == spec.from_arm))
    found = trained_output(source.run_dir)
    if found is None or found[1] is not Artefact.MODEL:
        raise ConfigError(f"arm '{name}': from_arm '{spec.from_arm}' has no trained adapter to start from")
    return found[0]


def arm_fingerprint(arm: Recipe, data) -> str:
    """What decides an arm's training: its recipe (less eval) and the prepared train split."""
    doc = arm.model_dump(mode="json", exclude={"eval"})
    h = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode())
    h.update("\n".join(e.id for e in data.splits["train"]).encode())
    return h.hexdigest()


def _loss_span(rows: list[dict]) -> str:
    losses = [r["train_loss"] for r in rows if r.get("train_loss") is not None]
    return f"{losses[0]:.3f} → {losses[-1]:.3f}" if losses else "–"


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
