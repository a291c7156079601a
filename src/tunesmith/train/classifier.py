"""``head: classifier``: LoRA plus a linear head on the last token's hidden state, for closed label sets.

transformers' ``*ForSequenceClassification`` models put a ``score`` layer over the hidden state
of the last non-padding token; PEFT's ``SEQ_CLS`` task trains that layer fully beside the LoRA
weights. Prediction is one forward pass per batch and gives a probability for every label,
instead of generating text and parsing it (or scoring every label's tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tunesmith.config import Recipe
from tunesmith.data.task import render_prompt


@dataclass
class ClassifierResult:
    output_dir: Path
    seconds: float
    metrics: dict
    model: object


def load_classifier(name: str, labels: list[str], placement, tokenizer):
    from transformers import AutoModelForSequenceClassification

    from tunesmith.models.registry import resolve

    model = AutoModelForSequenceClassification.from_pretrained(
        resolve(name),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        dtype=placement.torch_dtype,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(placement.device)


def wrap_classifier(model, lora, seed: int):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="SEQ_CLS",
    )
    return get_peft_model(model, config)


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
    from tunesmith.records import Rejected
    from tunesmith.train.stage import append_jsonl

    limit = recipe.train.max_seq_length
    rejected = [Rejected(ex.id, "train", f"{row['length']} tokens > train.max_seq_length {limit}", ex.inputs)
                for ex, row in zip(examples, rows, strict=True) if row["length"] > limit]
    if rejected:
        where = recipe.run_dir / "data" / "rejected.jsonl"
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


def train_classifier(recipe: Recipe, data, tokenizer, placement, console, bar, resume: bool = False):
    """Train the head (+ LoRA) on the train split, evaluate it on the test split, save both."""
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer

    from tunesmith.eval.metrics import classification_metrics
    from tunesmith.train.sft import fit, training_args

    t, labels = recipe.train, data.labels
    out_dir = recipe.run_dir / "train"
    index = {label: i for i, label in enumerate(labels)}
    texts = {k: [render_prompt(e, recipe.data.prompt) for e in v] for k, v in data.splits.items()}
    model = wrap_classifier(
        load_classifier(recipe.model.name, labels, placement, tokenizer), t.lora, recipe.seed
    )
    tokenizer.padding_side = "right"
    train = data.splits["train"]
    train_ds = Dataset.from_list(
        set_aside_long(recipe, train, encode(tokenizer, texts["train"], [index[e.target] for e in train]), console)
    )
    args = training_args(
        recipe,
        placement,
        out_dir,
        has_val=False,
        prediction_loss_only=False,
        include_num_input_tokens_seen="non_padding",
        metric_for_best_model=None,
    )
    pad = DataCollatorWithPadding(tokenizer)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        processing_class=tokenizer,
        data_collator=lambda rows: pad([{k: v for k, v in r.items() if k != "length"} for r in rows]),
    )
    seconds = fit(trainer, out_dir, resume, lambda steps: bar("train classifier", steps))
    final_dir = out_dir / "classifier"
    trainer.save_model(str(final_dir))
    tokenizer.save_pretrained(str(final_dir))
    test_rows = encode(tokenizer, texts["test"])
    cut = sum(r["length"] > t.max_seq_length for r in test_rows)
    if cut:
        console.print(f"[yellow]{cut} test text(s) longer than train.max_seq_length were cut to it for prediction[/]")
    probs = predict_proba(model, tokenizer, test_rows, max_len=t.max_seq_length)
    pred = [labels[max(range(len(p)), key=p.__getitem__)] for p in probs]
    gold = [e.target for e in data.splits["test"]]
    metrics = classification_metrics(gold, pred, labels) | {"train_seconds": seconds, "test_texts_cut": cut}
    (out_dir / "classifier_metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    with open(out_dir / "classifier_predictions.jsonl", "w", encoding="utf-8") as fh:
        for e, p, g in zip(data.splits["test"], probs, pred, strict=True):
            fh.write(
                json.dumps(
                    {
                        "id": e.id,
                        "gold": e.target,
                        "predicted": g,
                        "probabilities": dict(zip(labels, p, strict=True)),
                    }
                )
                + "\n"
            )
    console.print(
        f"classifier head: accuracy {metrics['accuracy']:.1%}, macro-F1 {metrics['macro_f1']:.3f} "
        f"on {metrics['n']} test examples; trained in {seconds:.0f}s"
    )
    return ClassifierResult(final_dir, seconds, metrics, model)
