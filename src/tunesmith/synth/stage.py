"""The synth stage of ``tunesmith run``: an arm's synth section run (cached per synth config) and its items turned
into training material by the task's own rule (:mod:`tunesmith.synth.augment`)."""

from __future__ import annotations

import hashlib
import json

from rich.console import Console

from tunesmith.config import Recipe
from tunesmith.errors import ConfigError, DataError
from tunesmith.records import Example
from tunesmith.synth.augment import Augmented, SynthBatch, ids_digest, rejected_reasons, write_jsonl_path
from tunesmith.synth.command import run_synth
from tunesmith.synth.generators import reads_train_split, synth_task


def augment(arm: Recipe, run: Recipe, train: list[Example], held_out: list[Example], console: Console) -> Augmented:
    """Run the arm's synth section (cached per synth config under ``<run>/synth/``) and turn its items into
    training material the way its task says (new examples past the leakage guard, or preference pairs)."""
    cfg = arm.synth
    task = synth_task(cfg.task)
    if cfg.review_required:
        raise ConfigError("synth.review_required: a run cannot wait for a human review; run `tunesmith synth`, "
                          "review the items, then train on synth/accepted.jsonl (data.path)")
    key = hashlib.sha256(cfg.model_dump_json().encode() + ids_digest(train)).hexdigest()[:12]
    base = run.run_dir / "synth" / key
    base.mkdir(parents=True, exist_ok=True)
    own_input = task.on_train_split is not None and cfg.input is None
    if own_input:
        cfg = task.on_train_split(cfg, arm, write_jsonl_path(base / "train_input.jsonl", train, arm))
    elif cfg.input is None:
        raise DataError(f"synth.input: the {cfg.task} task needs an input file ({' and '.join(reads_train_split())} "
                        "can read the train split instead)")
    synth_recipe = run.model_copy(update={"name": key, "output_dir": run.run_dir / "synth", "synth": cfg})
    result = run_synth(synth_recipe, console)
    items = [json.loads(line) for line in open(result.out_dir / "accepted.jsonl", encoding="utf-8")]  # accepted or edited
    replies = rejected_reasons(result.out_dir / "rejected.jsonl")
    return task.to_training(SynthBatch(items, replies, arm, train if own_input else None, held_out, base,
                                       result.out_dir, console))
