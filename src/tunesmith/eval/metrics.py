"""Classification metrics and a strict answer parser."""

from __future__ import annotations

from collections.abc import Sequence


def parse_label(output: str, labels: Sequence[str]) -> str | None:
    """Return the label the output names exactly (ignoring case, surrounding space and a final '.').

    Anything else is unparseable (``None``): it is counted as such, never mapped to a default.
    """
    answer = output.strip().rstrip(".").strip().casefold()
    for label in labels:
        if label.casefold() == answer:
            return label
    return None


def classification_metrics(gold: Sequence[str], pred: Sequence[str | None], labels: Sequence[str]) -> dict:
    """Accuracy, macro-F1 over the label set, and the unparseable count (which score as wrong)."""
    from sklearn.metrics import f1_score

    n = len(gold)
    if n == 0:
        return {"n": 0, "accuracy": None, "macro_f1": None, "unparseable": 0}
    unparseable = sum(p is None for p in pred)
    filled = [p if p is not None else "\x00unparseable" for p in pred]
    correct = sum(g == p for g, p in zip(gold, filled, strict=True))
    f1 = f1_score(gold, filled, labels=list(labels), average="macro", zero_division=0)
    return {"n": n, "accuracy": correct / n, "macro_f1": float(f1), "unparseable": unparseable}


def confusion(gold: Sequence[str], pred: Sequence[str | None], labels: Sequence[str]):
    """Confusion matrix with an extra last column for unparseable answers."""
    import numpy as np

    index = {label: i for i, label in enumerate(labels)}
    m = np.zeros((len(labels), len(labels) + 1), dtype=int)
    for g, p in zip(gold, pred, strict=True):
        if g in index:
            m[index[g], index.get(p, len(labels)) if p is not None else len(labels)] += 1
    return m
