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


def encode(tokenizer, texts: list[str], targets: list[int] | None, max_len: int) -> list[dict]:
    rows = []
    for i, text in enumerate(texts):
        ids = tokenizer(text, truncation=True, max_length=max_len)["input_ids"]
        row = {"input_ids": ids, "length": len(ids)}
        if targets is not None:
            row["labels"] = targets[i]
        rows.append(row)
    return rows


def token_counts(tokenizer, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts)["input_ids"]]


def set_aside_long(recipe: Recipe, tokenizer, examples: list, texts: list[str], console):
    """Training examples whose text fits ``train.max_seq_length``; the others go to data/rejected.jsonl
    with their length (a cut text could lose what decides its label)."""
    from tunesmith.records import Rejected
    from tunesmith.train.stage import append_jsonl

    limit = recipe.train.max_seq_length
    keep, rejected = [], []
    for ex, text, n in zip(examples, texts, token_counts(tokenizer, texts), strict=True):
        if n > limit:
            rejected.append(Rejected(ex.id, "train", f"{n} tokens > train.max_seq_length {limit}", text))
        else:
            keep.append((ex, text))
    if rejected:
        where = recipe.run_dir / "data" / "rejected.jsonl"
        append_jsonl(where, (r.to_json() for r in rejected))
        console.print(f"[yellow]{len(rejected)} training example(s) longer than train.max_seq_length set aside[/] → {where}")
    if not keep:
        from tunesmith.errors import DataError

        raise DataError("no training example fits train.max_seq_length; raise it")
    return [ex for ex, _ in keep], [text for _, text in keep]


def predict_proba(model, tokenizer, texts: list[str], batch_size: int = 32, max_len: int = 512):
    """Per-label probabilities, one forward pass per length-sorted batch; rows in the input order."""
    import torch

    tokenizer.padding_side = "right"
    enc = encode(tokenizer, texts, None, max_len)
    order = sorted(range(len(texts)), key=lambda i: -enc[i]["length"])
    probs = [None] * len(texts)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer.pad([{"input_ids": enc[i]["input_ids"]} for i in idx], return_tensors="pt")
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
    train, train_texts = set_aside_long(recipe, tokenizer, data.splits["train"], texts["train"], console)
    train_ds = Dataset.from_list(encode(tokenizer, train_texts, [index[e.target] for e in train], t.max_seq_length))
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
    cut = sum(n > t.max_seq_length for n in token_counts(tokenizer, texts["test"]))
    if cut:
        console.print(f"[yellow]{cut} test text(s) longer than train.max_seq_length were cut to it for prediction[/]")
    probs = predict_proba(model, tokenizer, texts["test"], max_len=t.max_seq_length)
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
