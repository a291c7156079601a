"""How each head kind trains (classifier, regression, span; what a head is lives in :mod:`tunesmith.models.heads`):
its training rows and head.json entries, examples too long for ``train.max_seq_length`` set aside and written out,
the head layer started from a linear probe where it reads the mean-pooled embedding, then one Trainer for every
head (LoRA with the head layer trained fully beside it, or a full fine-tune) saving the folder with its
tokenizer and head.json, so that evaluation, ``tunesmith serve`` and export need nothing else.
"""

from __future__ import annotations

import json
import math
import time
from typing import ClassVar

from tunesmith.config import Recipe
from tunesmith.errors import DataError
from tunesmith.machine.launch import is_main
from tunesmith.models.heads import HEADS, HeadKind, Target, batches, encode, write_head_meta
from tunesmith.models.spans import answer_span, label_window, question_and_context, windows
from tunesmith.records import Example, parse_number, render_prompt
from tunesmith.train.jobs import TrainJob, ordered, trainer
from tunesmith.train.metrics import rows_from_log_history, train_losses
from tunesmith.train.result import TrainResult, make_result, trainable_snapshot

# --- model -----------------------------------------------------------------------------------


# --- span windows ----------------------------------------------------------------------------


# --- training --------------------------------------------------------------------------------


def regression_rows(recipe: Recipe, train: list[Example], tokenizer, target: Target) -> list[dict]:
    rows = encode(tokenizer, [render_prompt(e, recipe.data.prompt) for e in train])
    for row, e in zip(rows, train, strict=True):
        row["labels"] = target.encode(float(parse_number(e.target)))
    return rows


def span_rows(recipe: Recipe, train: list[Example], tokenizer, console) -> list[dict]:
    """Every window of every training example with its start/end labels; examples whose answer is not in
    their context, or whose question leaves no room for context, go to data/rejected.jsonl."""
    from tunesmith.data.prepare import append_jsonl
    from tunesmith.records import Rejected

    t = recipe.train
    rows, rejected = [], []
    for e in train:
        question, context = question_and_context(e, recipe.data.input_fields, t.context_field)
        span = answer_span(e, context)
        if span is None:
            rejected.append(Rejected(e.id, "train", "the answer is not in the context (head: span)", e.inputs))
            continue
        try:
            found = windows(tokenizer, question, context, t.max_seq_length, t.span_stride)
        except Exception as exc:  # noqa: BLE001 - the tokenizer refuses a question longer than the window
            rejected.append(Rejected(e.id, "train", f"no room for context in train.max_seq_length: {exc}", e.inputs))
            continue
        for row in found:
            row["start_positions"], row["end_positions"] = label_window(row, span)
            rows.append({k: v for k, v in row.items() if k != "offsets"})
    if rejected:
        where = recipe.run_dir / "data" / "rejected.jsonl"
        append_jsonl(where, (r.to_json() for r in rejected))
        console.print(f"[yellow]{len(rejected)} training example(s) set aside for the span head[/] → {where}")
    if not rows:
        raise DataError("no training example has its answer inside its context (head: span)")
    return rows


# --- head kinds ------------------------------------------------------------------------------


def regression_loss(kind: str):
    """``l1`` or ``huber`` (delta 1, in standard deviations of the target) between the head's output and the
    standardised target, summed and divided by the items of the whole accumulated batch (as transformers
    expects of a ``compute_loss_func``), or averaged over the batch when that count is not given."""
    import torch

    def loss(outputs, labels, num_items_in_batch=None):
        pred = outputs.logits.reshape(-1).float()
        target = labels.reshape(-1).to(pred.dtype)
        if kind == "l1":
            each = torch.nn.functional.l1_loss(pred, target, reduction="none")
        else:
            each = torch.nn.functional.huber_loss(pred, target, reduction="none", delta=1.0)
        return each.sum() / num_items_in_batch if num_items_in_batch is not None else each.mean()

    return loss


# --- how each head kind trains ------------------------------------------------------------


class HeadTraining:
    """How one kind of head trains: its training rows and head.json entries, its loss, the linear probe that can
    start it, and what says it learned nothing. One subclass per head kind, in ``TRAINING`` by the kind's name."""

    kind: ClassVar[HeadKind]
    def train(self, recipe: Recipe, train: list[Example], labels: list[str], tokenizer, placement, bar, console,
              resume: bool, callbacks: list | None, build=None) -> TrainResult:
        return train_head(self, recipe, train, tokenizer, placement, bar, console, resume, callbacks, labels, build)

    def loss_func(self, train_section):
        """The Trainer's ``compute_loss_func`` for this kind, or None for the model's own loss."""
        return None

    def training_rows(self, recipe: Recipe, train: list[Example], labels: list[str], tokenizer,
                      console) -> tuple[list[dict], dict, int]:
        """Encoded training rows, this kind's head.json entries, and how many examples were set aside as too long."""
        raise NotImplementedError

    def probe(self, features, targets: list, outputs: int, seed: int):
        """``(weight, bias)`` of a linear model fitted on frozen sentence embeddings, shaped as the head layer."""
        raise NotImplementedError

    def learned_nothing(self, rows: list[dict], log: list[dict]) -> str | None:
        """Why the training rows' logged losses show that nothing was learned, or None."""
        return None


class ClassifierTraining(HeadTraining):
    """A classifier head: label indices, a logistic-regression probe, the label shares as the loss to beat."""

    kind = HEADS["classifier"]

    def training_rows(self, recipe, train, labels, tokenizer, console):

        if not labels:
            raise DataError("train.head classifier needs a classification task with a closed label set")
        index = {label: i for i, label in enumerate(labels)}
        texts = [render_prompt(e, recipe.data.prompt) for e in train]
        rows = set_aside_long(recipe, train, encode(tokenizer, texts, [index[e.target] for e in train]), console)
        return rows, {"labels": list(labels)}, len(train) - len(rows)

    def probe(self, features, targets, outputs, seed):
        """Multinomial logistic regression (C=10, as the embedding baseline); a label with no training row
        starts far below the others."""
        import numpy as np
        from sklearn.linear_model import LogisticRegression

        fitted = LogisticRegression(max_iter=3000, C=10.0, random_state=seed).fit(features, targets)
        coef, intercept = fitted.coef_, fitted.intercept_
        if len(fitted.classes_) == 2:  # one row for p(second class): split it over two logits
            coef, intercept = np.vstack([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
        weight = np.zeros((outputs, features.shape[1]), dtype=np.float32)
        bias = np.full(outputs, intercept.min() - 10.0, dtype=np.float32)
        weight[fitted.classes_], bias[fitted.classes_] = coef, intercept
        return weight, bias

    def learned_nothing(self, rows, log):
        """Said when the loss ended where always answering the label shares starts (their entropy): the
        head then answers (nearly) one label for every text, as the embedded decoder's last-token LoRA + head
        did on Korean reviews at every learning rate tried (docs/train.md)."""
        return stalled_at_prior([r["labels"] for r in rows], train_losses(log))


class RegressionTraining(HeadTraining):
    """A regression head: the standardised target, its loss, a ridge probe."""

    kind = HEADS["regression"]

    def loss_func(self, train_section):
        return None if train_section.regression_loss == "mse" else regression_loss(train_section.regression_loss)

    def training_rows(self, recipe, train, labels, tokenizer, console):
        target = Target(recipe.train.target_transform).fit([float(parse_number(e.target)) for e in train])
        rows = set_aside_long(recipe, train, regression_rows(recipe, train, tokenizer, target), console)
        return rows, {"target": target.__dict__}, len(train) - len(rows)

    def probe(self, features, targets, outputs, seed):
        """Ridge regression (alpha 1, as the embedding baseline) on the standardised target."""
        from sklearn.linear_model import Ridge

        fitted = Ridge(alpha=1.0).fit(features, targets)
        return fitted.coef_.reshape(1, -1), fitted.intercept_.reshape(1)


class SpanTraining(HeadTraining):
    """A span head: every window of every example with its start and end."""

    kind = HEADS["span"]

    def training_rows(self, recipe, train, labels, tokenizer, console):
        t = recipe.train
        extra = {"context_field": t.context_field, "stride": t.span_stride, "max_answer_tokens": t.max_answer_tokens}
        return span_rows(recipe, train, tokenizer, console), extra, 0


TRAINING: dict[str, HeadTraining] = {t.kind.name: t() for t in (ClassifierTraining, RegressionTraining, SpanTraining)}


def head_pooling(recipe: Recipe) -> str | None:
    """What vector a classifier or regression head reads: ``mean`` (the mean-pooled sentence embedding) or
    ``native`` (transformers' own head); ``train.pooling: auto`` is mean for a classifier on an encoder and
    native otherwise: a regression head on the unit-length mean embedding trained to a far worse error than
    on the [CLS] pooler (docs/train.md). None for heads that read every token (span)."""
    from tunesmith.models.encoders import is_encoder

    if not HEADS[recipe.train.head].pooled:
        return None
    if recipe.train.path == "reference":  # transformers' own *ForSequenceClassification
        return "native"
    if recipe.train.pooling != "auto":
        return recipe.train.pooling
    return "mean" if recipe.train.head == "classifier" and is_encoder(recipe.model.name) else "native"


def head_init(recipe: Recipe, pooling: str | None) -> str:
    """How the head layer starts: ``probe`` (a linear model fitted on the frozen sentence embeddings) or
    ``random``; ``train.head_init: auto`` probes wherever the head reads the mean-pooled embedding."""
    from tunesmith.errors import ConfigError

    wanted = recipe.train.head_init
    if wanted == "auto":
        return "probe" if pooling == "mean" else "random"
    if wanted == "probe" and pooling != "mean":
        raise ConfigError(f"train.head_init: probe fits a linear model on the mean-pooled sentence embedding; "
                          f"set train.pooling: mean (head {recipe.train.head}, pooling {pooling}) or head_init: random")
    return wanted


def sentence_embeddings(model, tokenizer, rows: list[dict], batch_size: int, bar):
    """The pooled embedding of every encoded row (the vectors the head layer reads), as a float32 array."""
    import numpy as np
    import torch

    out = np.zeros((len(rows), model.config.hidden_size), dtype=np.float32)
    was_training = model.training
    model.eval()
    with bar("probe: embed the training texts", len(rows)) as advance, torch.inference_mode():
        for idx, batch in batches(tokenizer, rows, batch_size, max(r["length"] for r in rows)):
            out[idx] = model.embed(**batch.to(model.device)).float().cpu().numpy()
            advance(len(idx))
    model.train(was_training)
    return out


def probe_rows(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    """The training rows the probe is fitted on: all, or a seeded sample of ``n`` (``train.probe_examples``)."""
    import random

    if n is None or n >= len(rows):
        return rows
    return random.Random(seed).sample(rows, n)


def probe_init(head: HeadTraining, model, tokenizer, rows: list[dict], seed: int, bar, console) -> None:
    """Start the head layer from a linear probe: a linear model fitted on the frozen sentence embeddings of the
    training rows, so that fine-tuning starts where the embedding baseline ends instead of from a random layer
    that first drags the pretrained features towards it (linear probing, then fine-tuning)."""

    import torch

    t0 = time.perf_counter()
    features = sentence_embeddings(model, tokenizer, rows, 64, bar)
    weight, bias = head.probe(features, [r["labels"] for r in rows], model.config.num_labels, seed)
    with torch.no_grad():
        model.score.weight.copy_(torch.as_tensor(weight, dtype=model.score.weight.dtype))
        model.score.bias.copy_(torch.as_tensor(bias, dtype=model.score.bias.dtype))
    console.print(f"head layer started from a linear probe on {len(rows):,} frozen sentence embeddings "
                  f"({time.perf_counter() - t0:.0f} s)")


def train_head(head: HeadTraining, recipe: Recipe, train: list[Example], tokenizer, placement, bar, console,
               resume: bool = False, callbacks: list | None = None, labels: list[str] | None = None,
               build=None) -> TrainResult:
    """Train a fresh ``head`` on its training rows (+ LoRA, or every weight) and save it with its head.json;
    ``build`` makes the Trainer (the arguments of :func:`build_head_trainer`; default: that one)."""
    from transformers import set_seed

    from tunesmith.models.loading import wrap_adapter
    from tunesmith.train.resume import complete_checkpoint

    t = recipe.train
    pooling = head_pooling(recipe)
    init = head_init(recipe, pooling)
    tokenizer.padding_side = "right"
    kind = head.kind
    meta = {"head": kind.name, "base_model": recipe.model.name, "prompt": recipe.data.prompt,
            "input_fields": list(recipe.data.input_fields), "max_length": t.max_seq_length}
    rows, extra, too_long = head.training_rows(recipe, train, labels, tokenizer, console)
    meta |= extra | ({"pooling": pooling, "head_init": init} if pooling else {})
    set_seed(recipe.seed)  # the new head's weights: the same in every run (and on every rank) of the recipe
    model = kind.load(recipe.model.name, placement, tokenizer, labels, pooling or "native")
    resuming = resume and complete_checkpoint(recipe.run_dir / "train" / "checkpoints") is not None
    if init == "probe" and not resuming:  # a resumed run reads the head layer from its checkpoint
        probe_init(head, model, tokenizer, probe_rows(rows, t.probe_examples, recipe.seed), recipe.seed, bar, console)
    model = wrap_adapter(model, t.adapter, t.lora, recipe.seed, task_type=kind.peft_task,
                         freeze_embeddings=t.freeze_embeddings)
    files = {"labels.json": json.dumps(labels, ensure_ascii=False)} if kind.label_probabilities else None
    result = fit_head(recipe, model, tokenizer, placement, rows, bar, kind=kind.folder,
                      label=f"train {kind.name} head", meta=meta, resume=resume, callbacks=callbacks,
                      loss_func=head.loss_func(t), files=files, mask=head_mask_kind(kind, pooling, model), build=build)
    result.too_long = too_long
    result.warning = head.learned_nothing(rows, result.rows)
    if result.warning:
        console.print(f"[yellow]{result.warning}[/]")
    return result


def stalled_at_prior(targets: list, losses: list[float], tolerance: float = 0.05) -> str | None:
    """A warning when the mean of the last quarter of the logged cross-entropy ``losses`` did not fall more
    than ``tolerance`` (relative) below the entropy of the ``targets``' shares — the loss of a head that ignores
    its input; None when it did, or when there is too little to tell (one label, no losses)."""
    from collections import Counter

    counts = Counter(targets)
    if len(counts) < 2 or not losses:
        return None
    prior = -sum(n / len(targets) * math.log(n / len(targets)) for n in counts.values())
    tail = losses[-max(1, len(losses) // 4):]
    last = sum(tail) / len(tail)
    if last < prior * (1 - tolerance):
        return None
    return (f"the head learned (almost) nothing beyond the label shares: its training loss ended at {last:.3f}, "
            f"not {tolerance:.0%} below the {prior:.3f} of always answering the shares. Try train.pooling: mean "
            f"with train.head_init: probe (the head starts from a linear model on mean-pooled states), or another "
            f"train.learning_rate.")


def head_mask_kind(head: HeadKind, pooling: str | None, model) -> str:
    """How a head's training batches reach the model: with the tokenizer's padding mask (``"2d"``), or with the
    4D mask of a decoder built from it on the device (:func:`~tunesmith.machine.masks.padded_mask_kind`). Mean
    pooling reads the 2D mask, so it keeps it."""
    from tunesmith.machine.masks import padded_mask_kind

    if head.pooled and (pooling or "native") != "native":
        return "2d"
    return padded_mask_kind(model)


def head_collator(tokenizer):
    """Pads a list of encoded rows into a batch of the keys a head model takes (right padding), with
    ``num_tokens``, the batch's real tokens counted on the host."""
    from transformers import DataCollatorWithPadding

    pad = DataCollatorWithPadding(tokenizer)
    keys = [*tokenizer.model_input_names, "labels", "start_positions", "end_positions"]

    def collate(rows: list[dict]) -> dict:
        batch = pad([{k: v for k, v in r.items() if k in keys} for r in rows])
        batch["num_tokens"] = sum(len(r["input_ids"]) for r in rows)
        return batch

    return collate


def fit_head(recipe: Recipe, model, tokenizer, placement, rows: list[dict], bar, *, kind: str, label: str, meta: dict,
             resume: bool, callbacks: list | None, files: dict[str, str] | None = None,
             loss_func=None, mask: str = "2d", build=None) -> TrainResult:
    """Train a wrapped head model on encoded rows and save it to ``train/<kind>/`` with its tokenizer,
    ``head.json`` and any extra ``files`` (name → text), written once under torchrun. Every head
    (classifier, regression, span) trains and saves through here; ``mask`` is how its batches carry the
    attention mask (:func:`head_mask_kind`); ``build`` makes the Trainer (default :func:`build_head_trainer`)."""
    from tunesmith.models.loading import set_attention_dropout
    from tunesmith.train.sft import fit, save_final

    set_attention_dropout(model, recipe.train.attention_dropout)
    out_dir = recipe.run_dir / "train"
    trainer = (build or build_head_trainer)(recipe, model, tokenizer, placement, rows, out_dir, loss_func, mask)
    before = trainable_snapshot(trainer.model)
    seconds = fit(trainer, out_dir, resume, lambda steps: bar(label, steps), callbacks)
    final_dir = out_dir / kind
    save_final(trainer, final_dir)
    if is_main():  # one writer under torchrun
        tokenizer.save_pretrained(str(final_dir))
        for name, text in (files or {}).items():
            (final_dir / name).write_text(text, encoding="utf-8")
        write_head_meta(final_dir, meta)
    return make_result(trainer, kind, final_dir, before, seconds,
                       rows_from_log_history(trainer.state.log_history), len(rows), resume)


def build_head_trainer(recipe: Recipe, model, tokenizer, placement, rows: list[dict], out_dir, loss_func, mask: str):
    """tunesmith's head Trainer: tokens counted on the host, a decoder's 4D padding mask built on the device."""
    from datasets import Dataset

    from tunesmith.train.sft import training_args
    from tunesmith.train.trainer import TokenCountingTrainer

    args = training_args(recipe, placement, out_dir, has_val=False, prediction_loss_only=False,
                         metric_for_best_model=None)
    return TokenCountingTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                processing_class=tokenizer, compute_loss_func=loss_func,
                                data_collator=head_collator(tokenizer), mask=mask, mask_dtype=placement.torch_dtype)


# --- prediction ------------------------------------------------------------------------------


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


def train_classifier(recipe: Recipe, train: list, labels: list[str], tokenizer, placement, bar,
                     console, resume: bool = False, callbacks: list | None = None) -> TrainResult:
    """Train the classifier head (+ LoRA) on ``train`` and save it, as ``tunesmith run`` trains a
    ``head: classifier`` arm; the evaluation path scores it like any contender."""

    return TRAINING["classifier"].train(recipe, train, labels, tokenizer, placement, bar, console, resume, callbacks)


@trainer("sft", *HEADS)  # a head trains on its own loss; the recipe's method stays sft
def head_job(job: TrainJob, build=None) -> TrainResult:
    """The job's head; ``build`` makes the Trainer (default: :func:`build_head_trainer`)."""
    r = job.recipe
    return TRAINING[r.train.head].train(r, ordered(r, job.data.train), job.data.labels, job.tokenizer, job.placement,
                                     job.bar, job.console, job.resume, job.callbacks, build)
