"""A trained head as a contender of the evaluation: one forward pass per batch, scored like every other."""

from __future__ import annotations

import time
from pathlib import Path

from tunesmith.models.head_predictor import HeadPredictor
from tunesmith.records import Example, render_prompt


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
