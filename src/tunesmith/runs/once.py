"""Train once per settings: what ``tunesmith train`` and each arm of ``tunesmith run`` do around
:func:`tunesmith.train.jobs.train`, so that both commands treat a run folder the same way.

- ``train/done.json``: the fingerprint of a finished training (the recipe less ``eval``, the train split's
  examples, the bytes of a DPO pairs file and of the adapter training starts from) and its summary. The
  same fingerprint again is not retrained; its summary is returned as it was.
- ``train/started.json``: the fingerprint the checkpoints under ``train/checkpoints`` belong to. Checkpoints
  of other settings are removed and training starts from scratch; those of the same settings are resumed.
  ``resume=True`` (``tunesmith train --resume``) insists: it resumes even a finished training and fails,
  instead of starting over, when there is no checkpoint or the checkpoints belong to other settings.
- The training summary (method, epochs, examples, parameters, tokens, time, peak memory, loss span,
  training path) that the run's report shows and ``tunesmith train`` prints.

Under torchrun every rank decides the same way (rank 0 first, the others after it) and only rank 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from tunesmith.config import Recipe
from tunesmith.errors import ConfigError, DataError
from tunesmith.hashing import content_hash
from tunesmith.records import Example

if TYPE_CHECKING:
    from tunesmith.synth.augment import Augmented
    from tunesmith.train.jobs import TrainData
    from tunesmith.train.result import TrainResult

# called only when training will run, with the recipe and its train examples: a synth stage's output or None
BeforeTraining = Callable[[Recipe, list[Example]], "Augmented | None"]


@dataclass
class Trained:
    """One training's outcome: its summary, where its model is, and the TrainResult when it trained now."""

    summary: dict
    output_dir: Path | None
    result: TrainResult | None = None  # None: trained before with the same settings, not retrained


@dataclass
class _Plan:
    recipe: Recipe
    train: list[Example]
    fingerprint: str
    summary: dict = field(default_factory=dict)
    resume: bool = False


def train_once(recipe: Recipe, data: TrainData, console: Console, bar, *, name: str,
               before: BeforeTraining | None = None, init_adapter: Path | None = None,
               base_model: str | None = None, resume: bool = False) -> Trained:
    """Train ``recipe`` on ``data`` unless it finished before with the same settings; ``before`` runs only when
    it trains (a synth stage: its examples join the train split, its preference pairs become ``train.dpo.path``).
    ``base_model`` is the run's model, named in the summary when the recipe trains another one."""
    from tunesmith.machine.launch import is_main, main_process_first
    from tunesmith.train.jobs import TrainData, train
    from tunesmith.train.result import trained_output

    out = recipe.run_dir / "train"
    data, sampled = sampled_train(recipe, data)
    recipe, data, chosen = fitted(recipe, data, console)
    with main_process_first():  # rank 0 decides about earlier checkpoints and runs any synth stage first
        key = fingerprint(recipe, data.train, init_adapter)
        done = None if resume else finished(out, key)
        if done is not None:
            console.print(f"{name}: trained before with the same settings ({out / 'done.json'}); not retrained")
        else:
            plan = _plan(recipe, data.train, key, name, before, console, resume)
    if done is not None:
        found = trained_output(recipe.run_dir)
        return Trained(done, found[0] if found else None)
    result = train(plan.recipe, TrainData(plan.train, data.val, data.labels), console, bar, resume=plan.resume,
                   init_adapter=init_adapter)
    summary = plan.summary | training_summary(plan.recipe, result, base_model or recipe.model.name)
    if sampled:
        summary["train split sampled (train.examples)"] = sampled
    summary |= chosen
    if is_main():
        (out / "done.json").write_text(json.dumps({"fingerprint": key, "summary": summary}, indent=2),
                                       encoding="utf-8")
    return Trained(summary, result.output_dir, result)


def sampled_train(recipe: Recipe, data: TrainData) -> tuple[TrainData, str | None]:
    """``data`` with its train split cut to ``train.examples`` (a seeded sample, stratified by label where there
    are labels) and how it was chosen; unchanged, with None, when the setting is off or the split is smaller."""
    from tunesmith.data.steps.split import sample_examples

    train, how = sample_examples(data.train, recipe.train.examples, bool(data.labels), recipe.seed)
    return (data, None) if train is data.train else (replace(data, train=train), how)


def fitted(recipe: Recipe, data: TrainData, console: Console) -> tuple[Recipe, TrainData, dict]:
    """The recipe and examples fitted to the data (:mod:`tunesmith.runs.fitting`: ``max_seq_length: auto``, long
    inputs cut) and what was chosen, with reasons; a decided recipe is written to the arm's
    ``config.resolved.yaml`` with its ``_chosen`` reasons."""
    from tunesmith.machine.launch import is_main
    from tunesmith.runs.fitting import fit_to_data

    if data.rows is not None:  # ready chat rows (fine-tuning jobs): nothing to fit
        return recipe, data, {}
    recipe, train, val, chosen = fit_to_data(recipe, data.train, data.val, console)
    if chosen and is_main():
        write_resolved(recipe, chosen)
    return recipe, replace(data, train=train, val=val), chosen


def write_resolved(recipe: Recipe, chosen: dict) -> None:
    """``config.resolved.yaml`` of the recipe as it trains, with ``_chosen``: each decided setting and why."""
    import yaml

    from tunesmith.config import dump_resolved

    path = recipe.run_dir / "config.resolved.yaml"
    dump_resolved(recipe, path)
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    doc["_chosen"] = chosen
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")


def fingerprint(recipe: Recipe, train: list[Example], init_adapter: Path | None = None) -> str:
    """What decides a training: the recipe (less ``eval``), the train split (each example's id, inputs and
    target: an edited data file with as many rows is another training) and, when present, the bytes of the
    DPO pairs file and of the adapter training continues from."""
    doc = recipe.model_dump(mode="json", exclude={"eval"})
    h = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode())
    for e in train:
        h.update(json.dumps([e.id, e.inputs, e.target], sort_keys=True, default=str).encode() + b"\n")
    pairs = recipe.train.dpo.path if recipe.train.spec.reads_pairs else None
    for source in (pairs, init_adapter):
        if source is not None and Path(source).exists():
            h.update(bytes.fromhex(content_hash(Path(source))))
    return h.hexdigest()


def finished(out: Path, key: str) -> dict | None:
    """The summary in ``out/done.json`` when it was written for the fingerprint ``key``."""
    done = _read_json(out / "done.json")
    return done.get("summary") if done.get("fingerprint") == key else None


def _plan(recipe: Recipe, train: list[Example], key: str, name: str, before: BeforeTraining | None,
          console: Console, resume: bool) -> _Plan:
    """The recipe and examples to train with, after ``before``; then which checkpoint, if any, to resume."""
    plan = _Plan(recipe, list(train), key)
    grown = before(recipe, plan.train) if before is not None else None
    if grown is not None:
        plan.train += grown.examples
        plan.summary |= grown.summary
        if grown.dpo_pairs is not None:
            plan.recipe = with_dpo_pairs(recipe, grown.dpo_pairs)
    if not plan.train and not plan.recipe.train.spec.reads_pairs:
        raise DataError(f"{name}: no training examples (the train split is empty and no synth stage added any)")
    plan.resume = checkpoint_to_resume(recipe.run_dir / "train", key, name, console, insist=resume) is not None
    return plan


def with_dpo_pairs(recipe: Recipe, pairs: Path) -> Recipe:
    """The recipe training DPO on ``pairs`` (a synth stage's preference pairs) instead of ``train.dpo.path``."""
    t = recipe.train
    return recipe.model_copy(update={"train": t.model_copy(update={"dpo": t.dpo.model_copy(update={"path": pairs})})})


def checkpoint_to_resume(out: Path, key: str, name: str, console: Console, insist: bool = False) -> Path | None:
    """The complete checkpoint under ``out/checkpoints`` made with the settings ``key``, or None (checkpoints
    of other settings are removed); records ``key`` in ``out/started.json``. With ``insist`` a missing
    checkpoint, or one of other settings, is an error instead. Only rank 0 removes and writes."""
    from tunesmith.machine.launch import is_main
    from tunesmith.train.resume import complete_checkpoint, newest_checkpoint

    folder = out / "checkpoints"
    checkpoint = newest_checkpoint(folder) if insist else complete_checkpoint(folder)
    made_with = _read_json(out / "started.json").get("fingerprint")
    if checkpoint is not None and made_with != key:
        if insist and made_with is not None:
            raise ConfigError(f"--resume: the checkpoints in {folder} were made with other settings than this "
                              "recipe's; run without --resume to remove them and train from scratch")
        if not insist:
            console.print(f"[yellow]{name}: the checkpoints in {folder} were made with other settings; "
                          "training from scratch[/]")
            if is_main():
                shutil.rmtree(folder)
            checkpoint = None
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "started.json").write_text(json.dumps({"fingerprint": key}), encoding="utf-8")
    if checkpoint is not None:
        console.print(f"{name}: resuming from {checkpoint}")
    return checkpoint


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def training_summary(recipe: Recipe, result: TrainResult, base_model: str) -> dict:
    """The training in a few lines for people: the report's "Training" table and ``tunesmith train``'s summary."""
    t = recipe.train
    warning = {"warning": result.warning} if result.warning else {}
    return warning | {
        "method": t.describe() + (f" on {recipe.model.name}" if recipe.model.name != base_model else ""),
        **length_line(t, result.rows, result.steps),
        "training examples (set aside as too long)": f"{result.examples:,} ({result.too_long:,})",
        "trainable parameters": f"{result.trainable_params:,} of {result.total_params:,}",
        "tokens trained": f"{result.tokens:,}",
        "training time": f"{result.seconds:.0f} s ({result.tokens_per_second:,.0f} tokens/s)"
                         + (", resumed from a checkpoint" if result.resumed else ""),
        "peak memory": f"{result.peak_memory_mb:,.0f} MB",
        "train loss first → last": loss_span(result.rows),
        **reward_span(result.rows),
        "trainable tensors that changed": f"{result.tensors_changed} of {result.tensors_trainable}",
        "training path": path_line(result.train_path),
    }


def length_line(t, rows: list[dict], steps: int | None = None) -> dict:
    """How long the training ran: the optimizer steps that ran under ``train.max_steps`` (as run --quick sets it;
    ``steps``, the trainer's count, else the last logged row's), else the epochs."""
    if not t.max_steps:
        return {"epochs / learning rate": f"{t.epochs:g} / {t.learning_rate:g}"}
    ran = steps or max((int(r["step"]) for r in rows if r.get("step") not in (None, "")), default=t.max_steps)
    return {"steps / learning rate": f"{ran:,} (train.max_steps {t.max_steps:,}) / {t.learning_rate:g}"}


def loss_span(rows: list[dict]) -> str:
    """The first and last logged training loss, e.g. ``2.310 → 0.412``."""
    from tunesmith.train.metrics import train_losses

    losses = train_losses(rows)
    return f"{losses[0]:.3f} → {losses[-1]:.3f}" if losses else "–"


def reward_span(rows: list[dict]) -> dict:
    """A reinforcement training's mean reward at its first and last logged step (± the spread), or nothing."""
    logged = [r for r in rows if r.get("train_reward_mean") is not None]
    if not logged:
        return {}
    first, last = (f"{r['train_reward_mean']:.3f} ± {r.get('train_reward_std') or 0:.3f}" for r in (logged[0], logged[-1]))
    return {"mean reward first → last (± spread)": f"{first} → {last}"}


def path_line(path: dict | None) -> str:
    """The chosen training path in one line (device, dtype, attention, packing, optimizer, kernels, ...)."""
    from tunesmith.machine.device import TrainPath

    return TrainPath(**path).describe() if path else "–"


def from_arm_adapter(recipe: Recipe, name: str) -> Path | None:
    """The adapter the arm ``name`` starts from (its ``from_arm``), which must have been trained first."""
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
