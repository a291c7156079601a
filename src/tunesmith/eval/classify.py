"""Evaluate contenders on a closed-label classification test split.

Every LLM contender gets the same prompts, the same label scoring and the same strict parser.
Label scoring (log-likelihood of each label) is the headline because it is fair to a base model
that has never seen the label format; free generation is reported beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tunesmith.config import EvalSection
from tunesmith.eval.generation import generate_greedy, score_labels
from tunesmith.eval.metrics import classification_metrics, is_ordinal, ordinal_metrics, parse_label, per_class


@dataclass
class ContenderResult:
    name: str
    description: str
    metrics: dict
    predictions: list[dict] = field(default_factory=list)
    headline: list[str | None] = field(default_factory=list)  # the predictions behind metrics["accuracy"]
    per_example: list[float | None] = field(default_factory=list)  # headline metric per example (bootstrap)
    kind: str = "llm"  # "llm" (local model), "endpoint" or "baseline"


def evaluate_llm(
    name: str,
    description: str,
    model,
    tokenizer,
    prompts: Sequence[str],
    ids: Sequence[str],
    gold: Sequence[str],
    labels: Sequence[str],
    suffix: str,
    cfg: EvalSection,
    bar,
) -> ContenderResult:
    """Generate (and score labels, unless disabled) for each prompt; ``bar(desc, total)`` gives advance()."""
    with bar(f"eval {name}: generate", len(prompts)) as advance:
        outputs = generate_greedy(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, advance)
    parsed = [parse_label(o, labels) for o in outputs]
    gen = classification_metrics(gold, parsed, labels)
    scored: list[str | None] = [None] * len(prompts)
    if cfg.label_scoring:
        with bar(f"eval {name}: score labels", len(prompts)) as advance:
            half = max(1, cfg.batch_size // 2)
            scores = score_labels(model, tokenizer, prompts, labels, suffix, half, advance)
        scored = [labels[j] for j in scores.argmax(axis=1)]
        head = classification_metrics(gold, scored, labels)
        metrics = {**head, "scoring": "label log-likelihood"}
        headline = scored
    else:
        metrics = {**gen, "scoring": "free generation"}
        headline = parsed
    metrics |= _label_details(gold, headline, labels)
    metrics |= {
        "accuracy_generate": gen["accuracy"],
        "macro_f1_generate": gen["macro_f1"],
        "unparseable_generate": gen["unparseable"],
    }
    preds = [
        {
            "model": name,
            "id": i,
            "prompt": p,
            "output": o,
            "parsed": pa,
            "scored": sc,
            "gold": g,
            "correct": h == g,
        }
        for i, p, o, pa, sc, g, h in zip(ids, prompts, outputs, parsed, scored, gold, headline, strict=True)
    ]
    per = [float(h == g) for h, g in zip(headline, gold, strict=True)]
    return ContenderResult(name, description, metrics, preds, headline, per)


def _label_details(gold, pred, labels) -> dict:
    """Per-class precision/recall, and for numeric (star) labels the ordinal MAE and within-one rate."""
    out = {"per_class": per_class(gold, pred, labels)}
    return out | ordinal_metrics(gold, pred) if is_ordinal(labels) else out


def evaluate_baseline(
    name: str, description: str, predicted: Sequence[str], ids, inputs, gold, labels
) -> ContenderResult:
    metrics = {**classification_metrics(gold, predicted, labels), "scoring": "direct prediction",
               **_label_details(gold, predicted, labels)}
    preds = [
        {"model": name, "id": i, "prompt": x, "output": p, "parsed": p, "scored": None, "gold": g,
         "correct": p == g}
        for i, x, p, g in zip(ids, inputs, predicted, gold, strict=True)
    ]
    return ContenderResult(name, description, metrics, preds, list(predicted),
                           [float(p == g) for p, g in zip(predicted, gold, strict=True)], "baseline")
