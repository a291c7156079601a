"""``head: classifier``: a linear head over a closed label set, on a decoder or an encoder.

The head reads one vector per text: transformers' ``*ForSequenceClassification`` reads the last
non-padding token's state on a decoder (its ``score`` layer) or the [CLS] pooler on an encoder
(``train.pooling: native``); :mod:`tunesmith.models.pooled` reads the mean of the token states, the
sentence embedding an encoder such as MiniLM or e5 was trained to produce (``train.pooling: mean``,
the default on encoders). PEFT's ``SEQ_CLS`` task trains that layer fully beside LoRA. Prediction is
one forward pass per batch and gives a probability for every label, instead of generating text and
parsing it (or scoring every label's tokens). Training runs through :func:`tunesmith.train.heads.train_head`.
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.config import Recipe
from tunesmith.machine.launch import is_main
from tunesmith.train.result import TrainResult


def load_sequence_head(name: str, placement, tokenizer, labels: list[str] | None = None, pooling: str = "native"):
    """A sequence head on ``name`` (a base model, or a saved full fine-tune): one output per label with
    ``labels``, one regression output without. ``pooling`` ``mean`` puts the head on the mean-pooled
    sentence embedding (:class:`~tunesmith.models.pooled.PooledForSequenceClassification`), ``native`` uses
    transformers' own ``AutoModelForSequenceClassification``; a saved folder loads as it was saved."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    from tunesmith.errors import ConfigError
    from tunesmith.models.loading import load_head_model, quantized
    from tunesmith.models.names import resolve
    from tunesmith.models.pooled import ARCHITECTURE, PooledForSequenceClassification
    from tunesmith.models.random_weights import is_random, save_weights

    ref = resolve(name)
    if is_random(ref):  # a random:<arch> base: its seeded weights written once, for from_pretrained
        save_weights(Path(ref))
    if labels:
        outputs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                   "label2id": {label: i for i, label in enumerate(labels)}}
    else:
        outputs = {"num_labels": 1, "problem_type": "regression"}
    config = AutoConfig.from_pretrained(ref)
    if quantized(placement) and (pooling == "mean" or ARCHITECTURE in (getattr(config, "architectures", None) or [])):
        raise ConfigError("train.adapter: qlora quantizes a decoder under transformers' own head (pooling: native); "
                          "a mean-pooled head (an encoder's) trains with adapter lora or full")
    if ARCHITECTURE in (getattr(config, "architectures", None) or []):  # a saved full fine-tune of a pooled head
        config.update(outputs)
        model = PooledForSequenceClassification.from_pretrained(ref, config=config, dtype=placement.torch_dtype)
    elif pooling == "mean":
        backbone = AutoModel.from_pretrained(ref, dtype=placement.torch_dtype)
        backbone.config.update(outputs)
        model = PooledForSequenceClassification(backbone.config, backbone)
    else:  # transformers' own head (on a QLoRA path over a 4-bit decoder)
        return load_head_model(AutoModelForSequenceClassification, ref, placement, tokenizer, **outputs)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(placement.device)


def encode(tokenizer, texts: list[str], targets: list | None = None) -> list[dict]:
    """Token ids of each text (never cut here) with its ``length`` and, for training, its label (index or value)."""
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


def batches(tokenizer, rows: list[dict], batch_size: int, max_len: int):
    """``(indices, padded batch)`` over the rows, longest first (little padding), ids beyond ``max_len`` cut."""
    tokenizer.padding_side = "right"
    order = sorted(range(len(rows)), key=lambda i: -rows[i]["length"])
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        keys = [k for k in tokenizer.model_input_names if k in rows[idx[0]] and k != "attention_mask"]
        yield idx, tokenizer.pad([{k: rows[i][k][:max_len] for k in keys} for i in idx], return_tensors="pt")


def predict_proba(model, tokenizer, rows: list[dict], batch_size: int = 32, max_len: int = 512):
    """Per-label probabilities for encoded rows, one forward pass per length-sorted batch; in the rows' order."""
    import torch

    probs = [None] * len(rows)
    model.eval()
    with torch.inference_mode():
        for idx, batch in batches(tokenizer, rows, batch_size, max_len):
            logits = model(**batch.to(model.device)).logits.float()
            for row, i in enumerate(idx):
                probs[i] = logits[row].softmax(-1).tolist()
    return probs


def train_classifier(recipe: Recipe, train: list, labels: list[str], tokenizer, placement, bar,
                     console, resume: bool = False, callbacks: list | None = None) -> TrainResult:
    """Train the classifier head (+ LoRA) on ``train`` and save it, as ``tunesmith run`` trains a
    ``head: classifier`` arm; the evaluation path scores it like any contender."""
    from tunesmith.train.heads import HEADS

    return HEADS["classifier"].train(recipe, train, labels, tokenizer, placement, bar, console, resume, callbacks)
