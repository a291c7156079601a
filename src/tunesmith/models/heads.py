"""Task heads: what each kind of head is (classifier, regression, span), how its model loads, the head.json a
trained head folder carries, and how its answers are read out.

- classifier: a linear head over a closed label set. transformers' ``*ForSequenceClassification`` reads the
  last non-padding token's state on a decoder (its ``score`` layer) or the [CLS] pooler on an encoder
  (``train.pooling: native``); :mod:`tunesmith.models.pooled` reads the mean of the token states, the sentence
  embedding an encoder such as MiniLM or e5 was trained to produce (``train.pooling: mean``). Prediction is one
  forward pass per batch with a probability for every label.
- regression: the same model class with one output, trained on the standardised transform of the target
  (``train.target_transform``, log1p by default); predictions are turned back into the target's units.
- span (extractive QA): ``*ForQuestionAnswering`` start/end logits over the context, read over overlapping
  windows (:mod:`tunesmith.models.spans`).

How each kind trains is in :mod:`tunesmith.train.heads`, how a trained folder answers in
:mod:`tunesmith.models.head_predictor`; evaluation (:mod:`tunesmith.eval.heads`) and export
(:mod:`tunesmith.export.heads`) answer through that predictor.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from tunesmith.errors import DataError
from tunesmith.models.spans import question_and_context
from tunesmith.records import Example, render_prompt

if TYPE_CHECKING:
    from tunesmith.models.head_predictor import HeadPredictor


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


class HeadKind:
    """What one kind of head is: its model class, where it is saved, and how a
    :class:`~tunesmith.models.head_predictor.HeadPredictor` reads its answers out. One subclass per kind,
    registered in ``HEADS``; how each trains is its entry in :data:`tunesmith.train.heads.TRAINING`."""

    name: ClassVar[str]
    folder: ClassVar[str] = "head"  # where training saves it, under train/
    peft_task: ClassVar[str] = "SEQ_CLS"  # the PEFT task type that trains the head layer beside LoRA
    label_probabilities: ClassVar[bool] = False  # answers with a distribution over labels (serve's logprobs)
    pooled: ClassVar[bool] = False  # reads one vector per text (train.pooling and train.head_init apply)

    def load(self, name: str, placement, tokenizer, labels: list[str] | None = None, pooling: str = "native"):
        """A fresh head on the base model ``name`` (an LLM, an encoder, or a saved full fine-tune)."""
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


class ClassifierHead(HeadKind):
    """A label per text, with every label's probability."""

    name = "classifier"
    folder = "classifier"
    label_probabilities = True
    pooled = True

    def load(self, name, placement, tokenizer, labels=None, pooling="native"):
        return load_sequence_head(name, placement, tokenizer, labels, pooling)

    def predict_texts(self, predictor, texts, batch_size):
        labels = predictor.meta["labels"]
        return [labels[max(range(len(p)), key=p.__getitem__)] for p in predictor.probabilities(texts, batch_size)]


class RegressionHead(HeadKind):
    """A number per text, learned on the standardised transform of the target and answered in its units."""

    name = "regression"
    pooled = True

    def load(self, name, placement, tokenizer, labels=None, pooling="native"):
        return load_sequence_head(name, placement, tokenizer, None, pooling)

    def predict_texts(self, predictor, texts, batch_size):
        import torch

        target = Target(**predictor.meta["target"])
        out = [0.0] * len(texts)
        with torch.inference_mode():
            for idx, batch in batches(predictor.tokenizer, encode(predictor.tokenizer, texts), batch_size,
                                      predictor.max_length):
                z = predictor.model(**batch.to(predictor.model.device)).logits.float().reshape(-1).tolist()
                for i, v in zip(idx, z, strict=True):
                    out[i] = target.decode(v)
        return out


class SpanHead(HeadKind):
    """Extractive QA: the best span of the context over all of its windows."""

    name = "span"
    peft_task = "QUESTION_ANS"

    def load(self, name, placement, tokenizer, labels=None, pooling="native"):
        from transformers import AutoModelForQuestionAnswering

        from tunesmith.models.loading import load_head_model
        from tunesmith.models.names import resolve

        return load_head_model(AutoModelForQuestionAnswering, resolve(name), placement, tokenizer)

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


def parse_prompt(template: str, text: str) -> dict | None:
    """The input fields of a rendered ``template`` (``"{context}\\n\\nQ: {question}"``), or None if ``text``
    does not follow it."""
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>.*?)" for i, p in enumerate(parts))
    found = re.fullmatch(pattern, text, flags=re.DOTALL)
    return found.groupdict() if found else None
