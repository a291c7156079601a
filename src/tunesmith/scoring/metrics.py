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


def per_class(gold: Sequence[str], pred: Sequence[str | None], labels: Sequence[str]) -> dict[str, dict]:
    """Precision, recall and support for each label (an unparseable answer is a miss for its gold label)."""
    from sklearn.metrics import precision_recall_fscore_support

    filled = [p if p is not None else "\x00unparseable" for p in pred]
    p, r, f, s = precision_recall_fscore_support(gold, filled, labels=list(labels), zero_division=0)
    return {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, lab in enumerate(labels)}


def is_ordinal(labels: Sequence[str]) -> bool:
    """Labels that are all whole numbers (star ratings) are ordinal: being off by one is less wrong."""
    try:
        return len(labels) > 2 and all(float(x).is_integer() for x in labels)
    except ValueError:
        return False


def ordinal_metrics(gold: Sequence[str], pred: Sequence[str | None]) -> dict:
    """Mean absolute error and within-one rate over numeric labels; unparseable answers are misses
    for within-one and are left out of the MAE (which then says over how many it was computed)."""
    pairs = [(float(g), float(p)) for g, p in zip(gold, pred, strict=True) if p is not None]
    n = len(gold)
    errors = [abs(g - p) for g, p in pairs]
    return {
        "ordinal_mae": sum(errors) / len(errors) if errors else None,
        "within_one": sum(e <= 1 for e in errors) / n if n else None,
    }


def band(pred: float | None, truth: float, bands) -> str:
    """'green', 'orange' or 'red' by absolute or relative error (either suffices); unparseable is red."""
    if pred is None:
        return "red"
    err = abs(pred - truth)
    rel = err / abs(truth) if truth else float("inf")
    if err < bands.green_abs or rel < bands.green_rel:
        return "green"
    if err < bands.orange_abs or rel < bands.orange_rel:
        return "orange"
    return "red"


def regression_metrics(gold: Sequence[float], pred: Sequence[float | None], bands) -> dict:
    """MAE, RMSLE and R² over the parseable predictions; hit bands over all examples.

    ``unparseable`` counts the answers with no number; they are red in the bands and left out
    of MAE/RMSLE/R² (``n_scored`` says over how many those were computed).
    """
    import math

    n = len(gold)
    pairs = [(g, p) for g, p in zip(gold, pred, strict=True) if p is not None]
    colours = [band(p, g, bands) for g, p in zip(gold, pred, strict=True)]
    out = {"n": n, "n_scored": len(pairs), "unparseable": n - len(pairs),
           "mae": None, "rmsle": None, "r2": None}
    for c in ("green", "orange", "red"):
        out[f"hit_{c}"] = colours.count(c) / n if n else None
    if pairs:
        g, p = zip(*pairs, strict=True)
        out["mae"] = sum(abs(a - b) for a, b in pairs) / len(pairs)
        logs = [(math.log1p(max(b, 0.0)) - math.log1p(max(a, 0.0))) ** 2 for a, b in pairs]
        out["rmsle"] = math.sqrt(sum(logs) / len(logs))
        mean = sum(g) / len(g)
        ss_tot = sum((a - mean) ** 2 for a in g)
        ss_res = sum((a - b) ** 2 for a, b in pairs)
        out["r2"] = 1 - ss_res / ss_tot if ss_tot else None
    return out
