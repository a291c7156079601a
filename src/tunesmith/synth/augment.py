"""Synthetic data as a stage of ``tunesmith run``: grow the TRAIN split, never the held-out ones.

``paraphrase`` without a ``synth.input`` rewords the train split's own questions (the answer and
other fields are kept); the other synth tasks read their inputs (documents, seed words, seed
instructions) and their items become examples through the data section's field names. Generated
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
from tunesmith.data.task import render_prompt
from tunesmith.errors import DataError
from tunesmith.records import Example, Record

LEAK_THRESHOLD = 0.8  # char 3-gram Jaccard of the rendered prompts


@dataclass
class Augmented:
    examples: list[Example]
    summary: dict = field(default_factory=dict)
    dpo_pairs: Path | None = None  # preference pairs made for a DPO arm


def augment(arm: Recipe, run: Recipe, train: list[Example], held_out: list[Example], console: Console) -> Augmented:
    """Run the arm's synth section (cached per synth config under ``<run>/synth/``) and return the new
    training examples that pass the leakage guard."""
    from tunesmith.synth.command import run_synth

    cfg = arm.synth
    if cfg.review_required:
        from tunesmith.errors import ConfigError

        raise ConfigError("synth.review_required: a run cannot wait for a human review; run `tunesmith synth`, "
                          "review the items, then train on synth/accepted.jsonl (data.path)")
    key = hashlib.sha256(cfg.model_dump_json().encode() + _ids_digest(train)).hexdigest()[:12]
    base = run.run_dir / "synth" / key
    base.mkdir(parents=True, exist_ok=True)
    own_input = cfg.task in ("paraphrase", "preference_pairs") and cfg.input is None
    if own_input:
        cfg = _read_train_split(cfg, arm, write_jsonl_path(base / "train_input.jsonl", train, arm))
    elif cfg.input is None:
        raise DataError(f"synth.input: the {cfg.task} task needs an input file (paraphrase and preference_pairs "
                        "can read the train split instead)")
    synth_recipe = run.model_copy(update={"name": key, "output_dir": run.run_dir / "synth", "synth": cfg})
    result = run_synth(synth_recipe, console)
    items = [json.loads(line) for line in open(result.out_dir / "accepted.jsonl", encoding="utf-8")]  # accepted or edited
    replies = _rejected_reasons(result.out_dir / "rejected.jsonl")
    if cfg.task == "preference_pairs":
        return _pairs(items, replies, train if own_input else None, arm, base, result.out_dir, console)
    made, unmapped = _paraphrased(items, train, arm) if own_input else _mapped(items, arm)
    kept, leaked = leakage_guard(made, held_out, arm.data.prompt)
    rejected = unmapped + [{"id": e.id, "reason": f"near-duplicate of held-out example {other} (leakage guard)",
                            "prompt": render_prompt(e, arm.data.prompt)} for e, other in leaked]
    write_jsonl(base / "augment_rejected.jsonl", rejected)
    summary = {
        "synth task": cfg.task,
        "synth items kept by the task": len(items),
        "synth replies set aside by the task": sum(replies.values()),
        "dropped: near-duplicate of a val/test example": len(leaked),
        "dropped: could not be mapped to an example": len(unmapped),
        "synthetic training examples added": len(kept),
    }
    if not kept:
        reasons = "; ".join(f"{n} × {r}" for r, n in replies.most_common(8)) or "none recorded"
        raise DataError(
            f"synth ({cfg.task}) yielded no usable training example for arm '{arm.name}': {len(items)} item(s) kept by the "
            f"task, {len(leaked)} leaked into val/test, {len(unmapped)} unmappable; replies set aside by reason: {reasons}. "
            f"See {result.out_dir / 'rejected.jsonl'} and {base / 'augment_rejected.jsonl'}"
        )
    console.print(f"synth: {len(kept)} synthetic training example(s) added ({len(leaked)} dropped by the leakage guard)")
    return Augmented(kept, summary)


def _ids_digest(train: list[Example]) -> bytes:
    return hashlib.sha256("\n".join(e.id for e in train).encode()).digest()


PROMPT_FIELD = "_prompt"  # the rendered prompt of a train example, for preference pairs


def write_jsonl_path(path: Path, train: list[Example], arm: Recipe) -> Path:
    """The train split as records for the synth task to read (``id`` carries the example id)."""
    write_jsonl(path, ({"id": e.id, **e.inputs, arm.data.target_field: e.target,
                        PROMPT_FIELD: render_prompt(e, arm.data.prompt)} for e in train))
    return path


def _read_train_split(cfg, arm: Recipe, path: Path):
    """The synth section pointed at the train split's records with the data section's field names."""
    if cfg.task == "paraphrase":
        q = cfg.paraphrase.question_field
        if q not in arm.data.input_fields:
            raise DataError(f"synth.paraphrase.question_field '{q}' is not one of data.input_fields {arm.data.input_fields}")
        task = cfg.paraphrase.model_copy(update={"answer_field": arm.data.target_field})
        return cfg.model_copy(update={"input": path, "paraphrase": task})
    task = cfg.preference_pairs.model_copy(update={"prompt_field": PROMPT_FIELD, "chosen_field": arm.data.target_field})
    return cfg.model_copy(update={"input": path, "preference_pairs": task})


def _pairs(items, replies: Counter, train: list[Example] | None, arm: Recipe, base: Path, synth_dir: Path,
           console: Console) -> Augmented:
    """Preference pairs for a DPO arm: chosen = the reference answer, rejected = the model's own answer; the
    prompt is the train example's chat messages, formatted as the arm formats them."""
    from tunesmith.data.formatting import chat_messages

    pairs = []
    for item in items:
        src = _source_example(item, train) if train is not None else None
        prompt = chat_messages(src, arm.data) if src is not None else item["prompt"]
        pairs.append({"prompt": prompt, "chosen": item["chosen"], "rejected": item["rejected"]})
    if not pairs:
        reasons = "; ".join(f"{n} × {r}" for r, n in replies.most_common(8)) or "none recorded"
        raise DataError(f"synth (preference_pairs) made no pair for arm '{arm.name}'; set aside by reason: {reasons}. "
                        f"See {synth_dir / 'rejected.jsonl'}")
    path = base / "dpo_pairs.jsonl"
    write_jsonl(path, pairs)
    console.print(f"synth: {len(pairs)} preference pair(s) for DPO → {path}")
    return Augmented([], {"synth task": "preference_pairs", "preference pairs made": len(pairs),
                          "synth replies set aside by the task": sum(replies.values())}, path)


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
    from tunesmith.data.task import to_examples

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
    from tunesmith.data.minhash import near_duplicate_pairs

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


def _rejected_reasons(path: Path) -> Counter:
    counts: Counter = Counter()
    if path.is_file():
        for line in open(path, encoding="utf-8"):
            reason = json.loads(line).get("reason", "unknown")
            counts[reason.split(":")[0][:80]] += 1
    return counts
