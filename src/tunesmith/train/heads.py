"""``head: regression`` and ``head: span``, and the one predictor every trained head answers through.

- regression: transformers' ``*ForSequenceClassification`` with one output and MSE loss, trained on the
  standardised transform of the target (``train.target_transform``, log1p by default: a price's error
  counts relative to the price); predictions are turned back into the target's units.
- span (extractive QA): ``*ForQuestionAnswering`` start/end logits over the context. A context longer
  than the window is cut into overlapping windows (``train.span_stride`` tokens shared), so no context is
  dropped and an answer near a window edge is whole in the next; the best span over all windows wins.

Both work on decoders (the head reads the last token, or every token for spans) and on encoders
(``models/encoders.py``), with LoRA (the head layer trained fully beside it) or a full fine-tune. The
saved folder holds ``head.json`` (kind, base model, labels or target transform, prompt) and the
tokenizer, so that evaluation, ``tunesmith serve`` and export need nothing else.

What differs between the head kinds (classifier, regression, span: the model class, the training rows,
how answers are read out) is one :class:`HeadKind` subclass each, registered in ``HEADS`` by name.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from tunesmith.config import Recipe
from tunesmith.data.examples import render_prompt
from tunesmith.errors import DataError
from tunesmith.records import Example
from tunesmith.train.metrics import rows_from_log_history, train_losses
from tunesmith.train.result import TrainResult, make_result, trainable_snapshot

HEAD_FILE = "head.json"


@dataclass
class Target:
    """The regression target as the head learns it: ``(transform(y) - mean) / std``."""

    transform: str
    mean: float = 0.0
    std: float = 1.0

    def raw(self, y: float) -> float:
        return math.log1p(y) if self.transform == "log1p" else y

    def fit(self, values: list[float]) -> Target:
        if self.transform == "log1p" and min(values) < 0:
            raise DataError("train.target_transform log1p needs targets >= 0; set train.target_transform: none")
        raw = [self.raw(v) for v in values]
        mean = sum(raw) / len(raw)
        std = math.sqrt(sum((r - mean) ** 2 for r in raw) / len(raw)) or 1.0
        return Target(self.transform, mean, std)

    def encode(self, y: float) -> float:
        return (self.raw(y) - self.mean) / self.std

    def decode(self, z: float) -> float:
        t = z * self.std + self.mean
        return math.expm1(min(t, 700.0)) if self.transform == "log1p" else t


# --- model -----------------------------------------------------------------------------------


def model_inputs(tokenizer, row: dict) -> dict:
    """The keys of an encoded row the model takes (a decoder has no token_type_ids)."""
    return {k: row[k] for k in tokenizer.model_input_names if k in row and k != "attention_mask"}


# --- span windows ----------------------------------------------------------------------------


def question_and_context(example: Example, fields: list[str], context_field: str) -> tuple[str, str]:
    if context_field not in example.inputs:
        raise DataError(f"train.context_field '{context_field}' is not an input field of example {example.id} "
                        f"(its fields: {', '.join(example.inputs)})")
    question = "\n".join(str(example.inputs[f]) for f in fields if f != context_field and f in example.inputs)
    return question, str(example.inputs[context_field])


def windows(tokenizer, question: str, context: str, max_len: int, stride: int) -> list[dict]:
    """The question with each window of the context (``stride`` tokens shared by neighbours); every row keeps
    the character offsets of its context tokens (``None`` for question and special tokens)."""
    enc = tokenizer(question, context, truncation="only_second", max_length=max_len, stride=stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True)
    out = []
    for i, ids in enumerate(enc["input_ids"]):
        seq = enc.sequence_ids(i)
        offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][i], seq, strict=True)]
        row = {"input_ids": ids, "length": len(ids), "offsets": offsets}
        if "token_type_ids" in enc:
            row["token_type_ids"] = enc["token_type_ids"][i]
        out.append(row)
    return out


def answer_span(example: Example, context: str) -> tuple[int, int] | None:
    """Character span of the first gold answer: its recorded start when it matches, else its first occurrence."""
    answer = (example.meta.get("answers") or [example.target])[0]
    start = example.meta.get("answer_start")
    if not (isinstance(start, int) and context[start : start + len(answer)] == answer):
        start = context.find(answer)
    return None if start < 0 or not answer else (start, start + len(answer))


def label_window(row: dict, span: tuple[int, int]) -> tuple[int, int]:
    """Token start/end of ``span`` in the window, or (0, 0) when the window does not hold all of it."""
    inside = [i for i, o in enumerate(row["offsets"]) if o is not None]
    first, last = inside[0], inside[-1]
    if row["offsets"][first][0] > span[0] or row["offsets"][last][1] < span[1]:
        return 0, 0
    start = next(i for i in inside if row["offsets"][i][1] > span[0])
    end = next(i for i in reversed(inside) if row["offsets"][i][0] < span[1])
    return start, end


def best_span(start_logits, end_logits, offsets: list, max_answer: int) -> tuple[float, tuple[int, int] | None]:
    """Highest start + end score over context tokens with start <= end < start + max_answer."""
    import torch

    ctx = torch.tensor([o is not None for o in offsets] + [False] * (len(start_logits) - len(offsets)))
    if not ctx.any():
        return -math.inf, None
    s = start_logits.masked_fill(~ctx, -1e9)
    e = end_logits.masked_fill(~ctx, -1e9)
    scores = s[:, None] + e[None, :]
    n = len(s)
    band = torch.ones(n, n, dtype=torch.bool).triu() & ~torch.ones(n, n, dtype=torch.bool).triu(max_answer)
    scores = scores.masked_fill(~band, -math.inf)
    flat = int(scores.argmax())
    i, j = divmod(flat, n)
    if offsets[i] is None or j >= len(offsets) or offsets[j] is None:
        return -math.inf, None
    return float(scores[i, j]), (offsets[i][0], offsets[j][1])


# --- training --------------------------------------------------------------------------------


def regression_rows(recipe: Recipe, train: list[Example], tokenizer, target: Target) -> list[dict]:
    from tunesmith.records import parse_number
    from tunesmith.train.classifier import encode

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


class HeadKind:
    """What one kind of head does differently: its model class, its training rows and head.json entries, and
    how a :class:`HeadPredictor` reads its answers out. One subclass per kind, registered in ``HEADS``."""

    name: ClassVar[str]
    folder: ClassVar[str] = "head"  # where training saves it, under train/
    peft_task: ClassVar[str] = "SEQ_CLS"  # the PEFT task type that trains the head layer beside LoRA
    label_probabilities: ClassVar[bool] = False  # answers with a distribution over labels (serve's logprobs)
    pooled: ClassVar[bool] = False  # reads one vector per text (train.pooling and train.head_init apply)

    def load(self, name: str, placement, tokenizer, labels: list[str] | None = None, pooling: str = "native"):
        """A fresh head on the base model ``name`` (an LLM, an encoder, or a saved full fine-tune)."""
        raise NotImplementedError

    def train(self, recipe: Recipe, train: list[Example], labels: list[str], tokenizer, placement, bar, console,
              resume: bool, callbacks: list | None) -> TrainResult:
        return train_head(self, recipe, train, tokenizer, placement, bar, console, resume, callbacks, labels)

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

    def predict_texts(self, predictor: HeadPredictor, texts: list[str], batch_size: int) -> list:
        """An answer per rendered prompt."""
        raise NotImplementedError

    def predict_examples(self, predictor: HeadPredictor, examples: list[Example], prompt: str) -> list:
        return predictor.predict_texts([render_prompt(e, prompt) for e in examples])

    def answer(self, predictor: HeadPredictor, text: str) -> str:
        """The reply to one user message (the rendered prompt the head was trained on), as text."""
        [value] = predictor.predict_texts([text])
        return value if isinstance(value, str) else f"{value:.2f}"

    def as_parsed(self, predictions: list) -> list:
        """Predictions as the task kind scores them (a span head's empty span: unanswered)."""
        return predictions

    def learned_nothing(self, rows: list[dict], log: list[dict]) -> str | None:
        """Why the training rows' logged losses show that nothing was learned, or None."""
        return None


class ClassifierHead(HeadKind):
    """A label per text, with every label's probability."""

    name = "classifier"
    folder = "classifier"
    label_probabilities = True
    pooled = True

    def load(self, name, placement, tokenizer, labels=None, pooling="native"):
        from tunesmith.train.classifier import load_sequence_head

        return load_sequence_head(name, placement, tokenizer, labels, pooling)

    def training_rows(self, recipe, train, labels, tokenizer, console):
        from tunesmith.train.classifier import encode, set_aside_long

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

    def predict_texts(self, predictor, texts, batch_size):
        labels = predictor.meta["labels"]
        return [labels[max(range(len(p)), key=p.__getitem__)] for p in predictor.probabilities(texts, batch_size)]


class RegressionHead(HeadKind):
    """A number per text, learned on the standardised transform of the target and answered in its units."""

    name = "regression"
    pooled = True

    def load(self, name, placement, tokenizer, labels=None, pooling="native"):
        from tunesmith.train.classifier import load_sequence_head

        return load_sequence_head(name, placement, tokenizer, None, pooling)

    def loss_func(self, train_section):
        return None if train_section.regression_loss == "mse" else regression_loss(train_section.regression_loss)

    def training_rows(self, recipe, train, labels, tokenizer, console):
        from tunesmith.records import parse_number
        from tunesmith.train.classifier import set_aside_long

        target = Target(recipe.train.target_transform).fit([float(parse_number(e.target)) for e in train])
        rows = set_aside_long(recipe, train, regression_rows(recipe, train, tokenizer, target), console)
        return rows, {"target": target.__dict__}, len(train) - len(rows)

    def probe(self, features, targets, outputs, seed):
        """Ridge regression (alpha 1, as the embedding baseline) on the standardised target."""
        from sklearn.linear_model import Ridge

        fitted = Ridge(alpha=1.0).fit(features, targets)
        return fitted.coef_.reshape(1, -1), fitted.intercept_.reshape(1)

    def predict_texts(self, predictor, texts, batch_size):
        import torch

        from tunesmith.train.classifier import batches, encode

        target = Target(**predictor.meta["target"])
        out = [0.0] * len(texts)
        with torch.inference_mode():
            for idx, batch in batches(predictor.tokenizer, encode(predictor.tokenizer, texts), batch_size,
                                      predictor.max_length):
                z = predictor.model(**batch.to(predictor.model.device)).logits.float().reshape(-1).tolist()
                for i, v in zip(idx, z, strict=True):
                    out[i] = target.decode(v)
        return out


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


class SpanHead(HeadKind):
    """Extractive QA: the best span of the context over all of its windows."""

    name = "span"
    peft_task = "QUESTION_ANS"

    def load(self, name, placement, tokenizer, labels=None, pooling="native"):
        from transformers import AutoModelForQuestionAnswering

        from tunesmith.models.loading import load_head_model
        from tunesmith.models.names import resolve

        return load_head_model(AutoModelForQuestionAnswering, resolve(name), placement, tokenizer)

    def training_rows(self, recipe, train, labels, tokenizer, console):
        t = recipe.train
        extra = {"context_field": t.context_field, "stride": t.span_stride, "max_answer_tokens": t.max_answer_tokens}
        return span_rows(recipe, train, tokenizer, console), extra, 0

    def predict_texts(self, predictor, texts, batch_size):
        raise DataError(f"{predictor.folder}: a span head answers (question, context) pairs, not texts")

    def predict_examples(self, predictor, examples, prompt):
        m = predictor.meta
        fields, ctx = m.get("input_fields") or list(examples[0].inputs), m.get("context_field", "context")
        return predictor.predict_spans([question_and_context(e, fields, ctx) for e in examples])

    def answer(self, predictor, text):
        m = predictor.meta
        fields = parse_prompt(m["prompt"], text)
        if fields is None:
            raise DataError(f"the message does not follow this head's prompt template {m['prompt']!r}")
        q, c = question_and_context(Example("request", fields, ""), m["input_fields"], m.get("context_field", "context"))
        return predictor.predict_spans([(q, c)])[0]

    def as_parsed(self, predictions):
        return [p or None for p in predictions]  # no span found: unanswered, as an empty reply is for any contender


HEADS: dict[str, HeadKind] = {k.name: k() for k in (ClassifierHead, RegressionHead, SpanHead)}


def head_kind(name: str) -> HeadKind:
    if name not in HEADS:
        raise DataError(f"unknown head kind '{name}'; known: {', '.join(sorted(HEADS))}")
    return HEADS[name]


def head_pooling(recipe: Recipe) -> str | None:
    """What vector a classifier or regression head reads: ``mean`` (the mean-pooled sentence embedding) or
    ``native`` (transformers' own head); ``train.pooling: auto`` is mean for a classifier on an encoder and
    native otherwise: a regression head on the unit-length mean embedding trained to a far worse error than
    on the [CLS] pooler (docs/train.md). None for heads that read every token (span)."""
    from tunesmith.models.encoders import is_encoder

    if not HEADS[recipe.train.head].pooled:
        return None
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

    from tunesmith.train.classifier import batches

    out = np.zeros((len(rows), model.config.hidden_size), dtype=np.float32)
    was_training = model.training
    model.eval()
    with bar("probe: embed the training texts", len(rows)) as advance, torch.inference_mode():
        for idx, batch in batches(tokenizer, rows, batch_size, max(r["length"] for r in rows)):
            out[idx] = model.embed(**batch.to(model.device)).float().cpu().numpy()
            advance(len(idx))
    model.train(was_training)
    return out


def probe_init(head: HeadKind, model, tokenizer, rows: list[dict], seed: int, bar, console) -> None:
    """Start the head layer from a linear probe: a linear model fitted on the frozen sentence embeddings of the
    training rows, so that fine-tuning starts where the embedding baseline ends instead of from a random layer
    that first drags the pretrained features towards it (linear probing, then fine-tuning)."""
    import time

    import torch

    t0 = time.perf_counter()
    features = sentence_embeddings(model, tokenizer, rows, 64, bar)
    weight, bias = head.probe(features, [r["labels"] for r in rows], model.config.num_labels, seed)
    with torch.no_grad():
        model.score.weight.copy_(torch.as_tensor(weight, dtype=model.score.weight.dtype))
        model.score.bias.copy_(torch.as_tensor(bias, dtype=model.score.bias.dtype))
    console.print(f"head layer started from a linear probe on {len(rows):,} frozen sentence embeddings "
                  f"({time.perf_counter() - t0:.0f} s)")


def train_head(head: HeadKind, recipe: Recipe, train: list[Example], tokenizer, placement, bar, console,
               resume: bool = False, callbacks: list | None = None, labels: list[str] | None = None) -> TrainResult:
    """Train a fresh ``head`` on its training rows (+ LoRA, or every weight) and save it with its head.json."""
    from transformers import set_seed

    from tunesmith.models.loading import wrap_adapter
    from tunesmith.train.resume import complete_checkpoint

    t = recipe.train
    pooling = head_pooling(recipe)
    init = head_init(recipe, pooling)
    tokenizer.padding_side = "right"
    meta = {"head": head.name, "base_model": recipe.model.name, "prompt": recipe.data.prompt,
            "input_fields": list(recipe.data.input_fields), "max_length": t.max_seq_length}
    rows, extra, too_long = head.training_rows(recipe, train, labels, tokenizer, console)
    meta |= extra | ({"pooling": pooling, "head_init": init} if pooling else {})
    set_seed(recipe.seed)  # the new head's weights: the same in every run (and on every rank) of the recipe
    model = head.load(recipe.model.name, placement, tokenizer, labels, pooling or "native")
    resuming = resume and complete_checkpoint(recipe.run_dir / "train" / "checkpoints") is not None
    if init == "probe" and not resuming:  # a resumed run reads the head layer from its checkpoint
        probe_init(head, model, tokenizer, rows, recipe.seed, bar, console)
    model = wrap_adapter(model, t.adapter, t.lora, recipe.seed, task_type=head.peft_task,
                         freeze_embeddings=t.freeze_embeddings)
    files = {"labels.json": json.dumps(labels, ensure_ascii=False)} if head.label_probabilities else None
    result = fit_head(recipe, model, tokenizer, placement, rows, bar, kind=head.folder,
                      label=f"train {head.name} head", meta=meta, resume=resume, callbacks=callbacks,
                      loss_func=head.loss_func(t), files=files, mask=head_mask_kind(head, pooling, model))
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
             loss_func=None, mask: str = "2d") -> TrainResult:
    """Train a wrapped head model on encoded rows and save it to ``train/<kind>/`` with its tokenizer,
    ``head.json`` and any extra ``files`` (name → text), written once under torchrun. Every head
    (classifier, regression, span) trains and saves through here; ``mask`` is how its batches carry the
    attention mask (:func:`head_mask_kind`)."""
    from datasets import Dataset

    from tunesmith.machine.launch import is_main
    from tunesmith.models.loading import set_attention_dropout
    from tunesmith.train.sft import fit, save_final, training_args
    from tunesmith.train.trainer import TokenCountingTrainer

    set_attention_dropout(model, recipe.train.attention_dropout)
    out_dir = recipe.run_dir / "train"
    args = training_args(recipe, placement, out_dir, has_val=False, prediction_loss_only=False,
                         metric_for_best_model=None)
    trainer = TokenCountingTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                   processing_class=tokenizer, compute_loss_func=loss_func,
                                   data_collator=head_collator(tokenizer), mask=mask, mask_dtype=placement.torch_dtype)
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


def write_head_meta(folder: Path, meta: dict) -> None:
    (Path(folder) / HEAD_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=2), encoding="utf-8")


def read_head_meta(folder: Path, base_model: str | None = None) -> dict | None:
    """head.json of a trained head folder (a classifier folder from before head.json: from labels.json)."""
    folder = Path(folder)
    if (folder / HEAD_FILE).is_file():
        return json.loads((folder / HEAD_FILE).read_text(encoding="utf-8"))
    if (folder / "labels.json").is_file():
        return {"head": "classifier", "base_model": base_model,
                "labels": json.loads((folder / "labels.json").read_text(encoding="utf-8"))}
    return None


# --- prediction ------------------------------------------------------------------------------


class HeadPredictor:
    """A trained head folder, loaded once: predicts labels, numbers or spans for texts or examples.
    Evaluation and the server both answer through it."""

    def __init__(self, folder: Path, placement=None, base_model: str | None = None):
        from transformers import AutoTokenizer

        from tunesmith.machine.placement import pick_placement

        self.folder = Path(folder)
        self.meta = read_head_meta(self.folder, base_model)
        if self.meta is None:
            raise DataError(f"{folder}: not a trained head (no {HEAD_FILE})")
        self.head = self.meta["head"]
        self.kind = head_kind(self.head)
        self.placement = placement or pick_placement()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder)) if (
            self.folder / "tokenizer_config.json").is_file() else _base_tokenizer(self.meta["base_model"])
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.model = self._load()
        self.max_length = int(self.meta.get("max_length") or 512)

    def _load(self):
        labels, pooling = self.meta.get("labels"), self.meta.get("pooling") or "native"
        if not (self.folder / "adapter_config.json").is_file():
            return self.kind.load(str(self.folder), self.placement, self.tokenizer, labels, pooling).eval()
        from peft import PeftModel

        base = self.kind.load(self.meta["base_model"], self.placement, self.tokenizer, labels, pooling)
        return PeftModel.from_pretrained(base, str(self.folder)).eval()

    @property
    def total_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def predict_texts(self, texts: list[str], batch_size: int = 32) -> list:
        """A label (classifier) or a number in the target's units (regression) per rendered prompt."""
        return self.kind.predict_texts(self, texts, batch_size)

    def probabilities(self, texts: list[str], batch_size: int = 32) -> list[list[float]]:
        from tunesmith.train.classifier import encode, predict_proba

        return predict_proba(self.model, self.tokenizer, encode(self.tokenizer, texts), batch_size, self.max_length)

    def ranked_labels(self, text: str) -> list[tuple[str, float]]:
        """A classifier head's labels with their probabilities for one rendered prompt, most probable first
        (ties keep the labels' order, so the first is the label :meth:`predict_texts` answers)."""
        if not self.kind.label_probabilities:
            raise DataError(f"{self.folder}: a {self.head} head has no label probabilities")
        [probs] = self.probabilities([text])
        return sorted(zip(self.meta["labels"], probs, strict=True), key=lambda lp: -lp[1])

    def predict_spans(self, pairs: list[tuple[str, str]], batch_size: int = 16) -> list[str]:
        """The best answer span of each (question, context), over all of the context's windows."""
        import torch

        m = self.meta
        rows = [(k, r) for k, (q, c) in enumerate(pairs) for r in self._windows(q, c)]
        best: dict[int, tuple[float, tuple[int, int] | None]] = {}
        with torch.inference_mode():
            for lo in range(0, len(rows), batch_size):
                chunk = rows[lo : lo + batch_size]
                batch = self.tokenizer.pad([model_inputs(self.tokenizer, r) for _, r in chunk],
                                           return_tensors="pt").to(self.model.device)
                out = self.model(**batch)
                for b, (k, r) in enumerate(chunk):
                    score, span = best_span(out.start_logits[b].float().cpu(), out.end_logits[b].float().cpu(),
                                            r["offsets"], int(m.get("max_answer_tokens", 32)))
                    if k not in best or score > best[k][0]:
                        best[k] = (score, span)
        return [pairs[k][1][best[k][1][0] : best[k][1][1]].strip() if best.get(k, (0, None))[1] else ""
                for k in range(len(pairs))]

    def _windows(self, question: str, context: str) -> list[dict]:
        """The context's windows; none (so no answer) when the question alone leaves no room for context."""
        try:
            return windows(self.tokenizer, question, context, self.max_length, int(self.meta.get("stride", 128)))
        except Exception:  # noqa: BLE001 - the tokenizer refuses a question longer than the window
            return []

    def predict_examples(self, examples: list[Example], prompt: str) -> list:
        return self.kind.predict_examples(self, examples, prompt)

    def answer(self, text: str) -> str:
        """The reply to one user message (the rendered prompt the head was trained on): the label, the number
        or the span, as text."""
        return self.kind.answer(self, text)


def _base_tokenizer(name: str):
    from tunesmith.models.loading import load_tokenizer

    return load_tokenizer(name)


def parse_prompt(template: str, text: str) -> dict | None:
    """The input fields of a rendered ``template`` (``"{context}\\n\\nQ: {question}"``), or None if ``text``
    does not follow it."""
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>.*?)" for i, p in enumerate(parts))
    found = re.fullmatch(pattern, text, flags=re.DOTALL)
    return found.groupdict() if found else None


def evaluate_head(task, name: str, description: str, folder: Path, examples: list[Example], prompt: str,
                  placement, bar, base_model: str | None = None):
    """A trained head as a contender: one forward pass per batch (no generation, no parsing), scored like
    every other contender; ``latency_ms`` is the prediction time per example. A classifier's predictions
    carry every label's probability."""
    from tunesmith.kinds import score_outputs
    from tunesmith.scoring.result import Source

    predictor = HeadPredictor(folder, placement, base_model)
    texts = [render_prompt(e, prompt) for e in examples]
    with bar(f"eval {name}: {predictor.head} head", len(examples)) as advance:
        t0 = time.perf_counter()
        if predictor.kind.label_probabilities:
            probs = predictor.probabilities(texts)
            labels = predictor.meta["labels"]
            pred = [labels[max(range(len(p)), key=p.__getitem__)] for p in probs]
        else:
            pred = predictor.predict_examples(examples, prompt)
        seconds = time.perf_counter() - t0
        advance(len(examples))
    pred = predictor.kind.as_parsed(pred)
    outputs = [p if isinstance(p, str) or p is None else f"{p:.2f}" for p in pred]
    res = score_outputs(task, name, description, Source.LOCAL, examples, texts, outputs, parsed=pred,
                        scoring=f"{predictor.head} head")
    res.metrics["latency_ms"] = round(1000 * seconds / max(1, len(examples)), 2)
    res.metrics["parameters"] = predictor.total_params
    if predictor.kind.label_probabilities:
        lengths = predictor.tokenizer(texts)["input_ids"]
        res.metrics["texts_cut"] = sum(len(ids) > predictor.max_length for ids in lengths)  # cut to predict
        for row, p in zip(res.predictions, probs, strict=True):
            row["probabilities"] = dict(zip(labels, p, strict=True))
    return res


def export_head(folder: Path, out: Path, base_model: str | None = None) -> Path:
    """A trained head as one plain transformers folder: LoRA merged into the base weights, the head layer, the
    tokenizer and head.json (labels or target transform), loadable by ``AutoModelFor…`` and by
    ``tunesmith serve --adapter`` with no base model. A mean-pooled head carries its modeling code
    (``AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True)``)."""
    import shutil

    from tunesmith.models.pooled import PooledForSequenceClassification

    predictor = HeadPredictor(folder, base_model=base_model)
    model = predictor.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if isinstance(model, PooledForSequenceClassification):  # save_pretrained copies pooled.py, sets auto_map
        PooledForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    predictor.tokenizer.save_pretrained(out)
    write_head_meta(out, {**predictor.meta, "merged_from": predictor.meta.get("base_model")})
    if (Path(folder) / "labels.json").is_file():
        shutil.copy(Path(folder) / "labels.json", out / "labels.json")
    return out
