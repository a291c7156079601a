"""``head: classifier``: LoRA plus a linear head on the last token's hidden state, for closed label sets.

transformers' ``*ForSequenceClassification`` models put a ``score`` layer over the hidden state
of the last non-padding token; PEFT's ``SEQ_CLS`` task trains that layer fully beside the LoRA
weights. Prediction is one forward pass per batch and gives a probability for every label,
instead of generating text and parsing it (or scoring every label's tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.config import Recipe
from tunesmith.data.task import render_prompt
from tunesmith.distributed import is_main
from tunesmith.train.result import TrainResult


def load_classifier(name: str, labels: list[str], placement, tokenizer):
    from transformers import AutoModelForSequenceClassification

    from tunesmith.models.random_weights import is_random, save_weights
    from tunesmith.models.registry import resolve

    ref = resolve(name)
    if is_random(ref):  # a random:<arch> base: its seeded weights written once, for from_pretrained
        save_weights(Path(ref))
    model = AutoModelForSequenceClassification.from_pretrained(
        ref,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        dtype=placement.torch_dtype,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(placement.device)


def encode(tokenizer, texts: list[str], targets: list[int] | None = None) -> list[dict]:
    """Token ids of each text (never cut here) with its ``length`` and, for training, its label index."""
    rows = []
    for i, ids in enumerate(tokenizer(texts)["input_ids"]):
        row = {"input_ids": ids, "length": len(ids)}
        if targets is not None:
            row["labels"] = targets[i]
        rows.append(row)
    return rows


def set_aside_long(recipe: Recipe, examples: list, rows: list[dict], console) -> list[dict]:
    """The encoded training rows that fit ``train.max_seq_length``; the others go to data/rejected.jsonl
    with their length (a cut text could lose what decides its label)."""
    from tunesmith.data.prepare import append_jsonl
    from tunesmith.records import Rejected

    limit = recipe.train.max_seq_length
    rejected = [Rejected(ex.id, "train", f"{row['length']} tokens > train.max_seq_length {limit}", ex.inputs)
                for ex, row in zip(examples, rows, strict=True) if row["length"] > limit]
    if rejected:
        where = recipe.run_dir / "data" / "rejected.jsonl"
        if is_main():
            append_jsonl(where, (r.to_json() for r in rejected))
        console.print(f"[yellow]{len(rejected)} training example(s) longer than train.max_seq_length set aside[/] → {where}")
    keep = [row for row in rows if row["length"] <= limit]
    if not keep:
        from tunesmith.errors import DataError

        raise DataError("no training example fits train.max_seq_length; raise it")
    return keep


def predict_proba(model, tokenizer, rows: list[dict], batch_size: int = 32, max_len: int = 512):
    """Per-label probabilities for encoded rows (ids beyond ``max_len`` cut), one forward pass per
    length-sorted batch; results in the rows' order."""
    import torch

    tokenizer.padding_side = "right"
    order = sorted(range(len(rows)), key=lambda i: -rows[i]["length"])
    probs = [None] * len(rows)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer.pad([{"input_ids": rows[i]["input_ids"][:max_len]} for i in idx], return_tensors="pt")
            logits = model(**batch.to(model.device)).logits.float()
            for row, i in enumerate(idx):
                probs[i] = logits[row].softmax(-1).tolist()
    return probs


def train_classifier(recipe: Recipe, train: list, labels: list[str], tokenizer, placement, bar,
                     console, resume: bool = False, callbacks: list | None = None) -> TrainResult:
    """Train the head (+ LoRA) on ``train`` and save it; the evaluation path scores it like any contender."""
    from transformers import set_seed

    from tunesmith.models.loading import wrap_adapter
    from tunesmith.train.heads import fit_head

    t = recipe.train
    index = {label: i for i, label in enumerate(labels)}
    texts = [render_prompt(e, recipe.data.prompt) for e in train]
    set_seed(recipe.seed)  # the new head's weights: the same in every run (and on every rank) of the recipe
    model = wrap_adapter(load_classifier(recipe.model.name, labels, placement, tokenizer), t.adapter, t.lora,
                         recipe.seed, task_type="SEQ_CLS", freeze_embeddings=t.freeze_embeddings)
    tokenizer.padding_side = "right"
    rows = set_aside_long(recipe, train, encode(tokenizer, texts, [index[e.target] for e in train]), console)
    meta = {"head": "classifier", "base_model": recipe.model.name, "labels": labels, "prompt": recipe.data.prompt,
            "input_fields": list(recipe.data.input_fields), "max_length": t.max_seq_length}
    result = fit_head(recipe, model, tokenizer, placement, rows, bar, kind="classifier", label="train classifier",
                      meta=meta, resume=resume, callbacks=callbacks,
                      files={"labels.json": json.dumps(labels, ensure_ascii=False)})
    result.too_long = len(train) - len(rows)
    return result


def load_trained_classifier(folder: Path, name: str, placement, tokenizer):
    """A saved classifier, and its labels, for evaluation: head + LoRA on a fresh base model, or the whole
    fully fine-tuned model from ``folder``."""
    labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
    if not (folder / "adapter_config.json").is_file():
        return load_classifier(str(folder), labels, placement, tokenizer).eval(), labels
    from peft import PeftModel

    base = load_classifier(name, labels, placement, tokenizer)
    return PeftModel.from_pretrained(base, str(folder)).eval(), labels
