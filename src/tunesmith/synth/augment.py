"""Synthetic data as a stage of ``tunesmith run``: grow the TRAIN split, never the held-out ones.

``paraphrase`` without a ``synth.input`` rewords the train split's own questions (the answer and
other fields are kept), and ``preference_pairs`` without one pairs each train answer with a worse one;
the other synth tasks read their inputs (documents, seed words, seed instructions) and their items
become examples through the data section's field names. Which of these a task does is registered with
it (:func:`tunesmith.synth.generators.register`); the functions it names live here. Generated
examples that are near-duplicates of a val/test example are dropped (leakage guard), and every
item set aside is written to ``augment_rejected.jsonl`` with its reason and counted.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from tunesmith.config import Recipe
from tunesmith.data.prepare import write_jsonl
from tunesmith.errors import DataError
from tunesmith.records import Example, Record, render_prompt

LEAK_THRESHOLD = 0.8  # char 3-gram Jaccard of the rendered prompts


@dataclass
class Augmented:
    examples: list[Example]
    summary: dict = field(default_factory=dict)
    dpo_pairs: Path | None = None  # preference pairs made for a DPO arm


@dataclass
class SynthBatch:
    """What an arm's synth task made, with what turning it into training material needs."""

    items: list[dict]  # the items the task kept (accepted or edited)
    replies: Counter  # replies the task set aside, by reason
    arm: Recipe
    train: list[Example] | None  # the train split, when the task read it instead of a synth.input
    held_out: list[Example]  # val and test, for the leakage guard
    base: Path  # <run>/synth/<key>/: augment_rejected.jsonl, dpo_pairs.jsonl
    synth_dir: Path  # the synth run's folder (its rejected.jsonl)
    console: Console


def as_examples(batch: SynthBatch) -> Augmented:
    """Items whose fields are the data section's input and target fields become examples."""
    return _guarded(batch, *_mapped(batch.items, batch.arm))


def as_paraphrases(batch: SynthBatch) -> Augmented:
    """Paraphrases of the train split's questions become copies of their source examples; paraphrases of a
    synth.input file map like any other items."""
    made = _paraphrased(batch.items, batch.train, batch.arm) if batch.train is not None else _mapped(batch.items, batch.arm)
    return _guarded(batch, *made)


def _guarded(batch: SynthBatch, made: list[Example], unmapped: list[dict]) -> Augmented:
    """The new examples that pass the leakage guard; what was set aside goes to augment_rejected.jsonl."""
    arm, items, replies, task = batch.arm, batch.items, batch.replies, batch.arm.synth.task
    kept, leaked = leakage_guard(made, batch.held_out, arm.data.prompt)
    rejected = unmapped + [{"id": e.id, "reason": f"near-duplicate of held-out example {other} (leakage guard)",
                            "prompt": render_prompt(e, arm.data.prompt)} for e, other in leaked]
    write_jsonl(batch.base / "augment_rejected.jsonl", rejected)
    summary = {
        "synth task": task,
        "synth items kept by the task": len(items),
        "synth replies set aside by the task": sum(replies.values()),
        "dropped: near-duplicate of a val/test example": len(leaked),
        "dropped: could not be mapped to an example": len(unmapped),
        "synthetic training examples added": len(kept),
    }
    if not kept:
        reasons = "; ".join(f"{n} × {r}" for r, n in replies.most_common(8)) or "none recorded"
        raise DataError(
            f"synth ({task}) yielded no usable training example for arm '{arm.name}': {len(items)} item(s) kept by the "
            f"task, {len(leaked)} leaked into val/test, {len(unmapped)} unmappable; replies set aside by reason: {reasons}. "
            f"See {batch.synth_dir / 'rejected.jsonl'} and {batch.base / 'augment_rejected.jsonl'}"
        )
    batch.console.print(f"synth: {len(kept)} synthetic training example(s) added ({len(leaked)} dropped by the leakage guard)")
    return Augmented(kept, summary)


def ids_digest(train: list[Example]) -> bytes:
    return hashlib.sha256("\n".join(e.id for e in train).encode()).digest()


PROMPT_FIELD = "_prompt"  # the rendered prompt of a train example, for preference pairs


def write_jsonl_path(path: Path, train: list[Example], arm: Recipe) -> Path:
    """The train split as records for the synth task to read (``id`` carries the example id)."""
    write_jsonl(path, ({"id": e.id, **e.inputs, arm.data.target_field: e.target,
                        PROMPT_FIELD: render_prompt(e, arm.data.prompt)} for e in train))
    return path


def paraphrase_train_split(cfg, arm: Recipe, path: Path):
    """The paraphrase section pointed at the train split's records: the data section's question and answer."""
    q = cfg.paraphrase.question_field
    if q not in arm.data.input_fields:
        raise DataError(f"synth.paraphrase.question_field '{q}' is not one of data.input_fields {arm.data.input_fields}")
    task = cfg.paraphrase.model_copy(update={"answer_field": arm.data.target_field})
    return cfg.model_copy(update={"input": path, "paraphrase": task})


def preference_pairs_train_split(cfg, arm: Recipe, path: Path):
    """The preference_pairs section pointed at the train split's records: rendered prompt, reference answer."""
    task = cfg.preference_pairs.model_copy(update={"prompt_field": PROMPT_FIELD, "chosen_field": arm.data.target_field})
    return cfg.model_copy(update={"input": path, "preference_pairs": task})


def as_dpo_pairs(batch: SynthBatch) -> Augmented:
    """Preference pairs for a DPO arm: chosen = the reference answer, rejected = the model's own answer; the
    prompt is the train example's chat messages, formatted as the arm formats them."""
    from tunesmith.data.formats.messages import chat_messages

    arm, train = batch.arm, batch.train
    pairs = []
    for item in batch.items:
        src = _source_example(item, train) if train is not None else None
        prompt = chat_messages(src, arm.data) if src is not None else item["prompt"]
        pairs.append({"prompt": prompt, "chosen": item["chosen"], "rejected": item["rejected"]})
    if not pairs:
        reasons = "; ".join(f"{n} × {r}" for r, n in batch.replies.most_common(8)) or "none recorded"
        raise DataError(f"synth (preference_pairs) made no pair for arm '{arm.name}'; set aside by reason: {reasons}. "
                        f"See {batch.synth_dir / 'rejected.jsonl'}")
    path = batch.base / "dpo_pairs.jsonl"
    write_jsonl(path, pairs)
    batch.console.print(f"synth: {len(pairs)} preference pair(s) for DPO → {path}")
    return Augmented([], {"synth task": "preference_pairs", "preference pairs made": len(pairs),
                          "synth replies set aside by the task": sum(batch.replies.values())}, path)


def _paraphrased(items: list[dict], train: list[Example], arm: Recipe) -> tuple[list[Example], list[dict]]:
    """A copy of the source example with its question replaced by each paraphrase."""
    q = arm.synth.paraphrase.question_field
    made, bad = [], []
    for item in items:
        src = _source_example(item, train)
        if src is None:
            bad.append({"item": item, "reason": f"source {item.get('source')!r} is not a line of the train split file"})
            continue
        made.append(Example(f"{src.id}~p{item.get('variant', len(made) + 1)}", {**src.inputs, q: item["question"]},
                            src.target, {**src.meta, "synthetic": "paraphrase"}))
    return made, bad


def _source_example(item: dict, train: list[Example]) -> Example | None:
    """The train example an item came from: the line number in its ``source`` indexes the train split file."""
    line = str(item.get("source", "")).rsplit(":", 1)[-1]
    idx = int(line) - 1 if line.isdigit() else -1
    return train[idx] if 0 <= idx < len(train) else None


def _mapped(items: list[dict], arm: Recipe) -> tuple[list[Example], list[dict]]:
    """Items whose fields are the data section's input and target fields become examples."""
    from tunesmith.data.steps.examples import to_examples

    cfg = arm.data.model_copy(update={"on_error": "skip", "labels": arm.data.labels})
    records = [Record(item, f"synth:{i + 1}") for i, item in enumerate(items)]
    try:
        examples, rejected = to_examples(records, cfg)
    except DataError as exc:
        raise DataError(f"synth items cannot become training examples: {exc} (name the synth output fields in "
                        "data.input_fields / data.target_field)") from None
    for e in examples:
        e.id, e.meta = f"synth-{e.id}", {**e.meta, "synthetic": arm.synth.task}
    return examples, [{"item": r.record, "reason": r.reason} for r in rejected]


def leakage_guard(made: list[Example], held_out: list[Example], template: str) -> tuple[list[Example], list]:
    """Drop generated examples whose prompt is a near-duplicate (char 3-gram Jaccard ≥ 0.8) of a held-out one."""
    from tunesmith.data.dedup.minhash import near_duplicate_pairs

    if not made or not held_out:
        return made, []
    texts = [render_prompt(e, template) for e in held_out] + [render_prompt(e, template) for e in made]
    pairs, _ = near_duplicate_pairs(texts, LEAK_THRESHOLD, "char", 3, 128, 1)
    n = len(held_out)
    leaks: dict[int, str] = {}
    for i, j in pairs.tolist():
        a, b = sorted((i, j))
        if a < n <= b:
            leaks.setdefault(b - n, held_out[a].id)
    return [e for k, e in enumerate(made) if k not in leaks], [(made[k], other) for k, other in leaks.items()]


def rejected_reasons(path: Path) -> Counter:
    counts: Counter = Counter()
    if path.is_file():
        for line in open(path, encoding="utf-8"):
            reason = json.loads(line).get("reason", "unknown")
            counts[reason.split(":")[0][:80]] += 1
    return counts
