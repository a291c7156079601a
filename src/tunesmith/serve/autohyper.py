"""'auto' fine-tuning hyperparameters, resolved to the numbers a job trains with (reported on the job).

Epochs follow OpenAI's rule (about 3 passes, more for small files so that a file of a dozen examples is
seen about 100 times); the batch grows with the file; the learning rate multiplies the LoRA base rate and
is fitted to the data size: a small file, trained in few optimizer steps, needs a larger one to be learned.
"""

from __future__ import annotations

import math

LR_BASE = 2e-4  # multiplied by learning_rate_multiplier (1.0: the rate LoRA recipes use by default)


def auto_batch_size(n_examples: int) -> int:
    """A power of two near n/64, from 1 to 8: small files take a step per example."""
    return max(1, min(8, 2 ** int(math.log2(max(1, n_examples // 64)))))


def auto_learning_rate_multiplier(n_examples: int, batch_size: int) -> float:
    """2 for files of a few hundred examples or more, up to 4 for the smallest (their fewer steps), scaled
    by the square root of the batch (a larger batch averages away noise and takes a larger step)."""
    small = 4.0 if n_examples < 100 else 2.0
    return round(small * math.sqrt(batch_size), 2)


def resolve_hyperparameters(method: dict, n_examples: int) -> dict:
    """The method's hyperparameters with every 'auto' (or missing) value replaced by the number used."""
    from tunesmith.data.validate import default_epochs

    hyper = dict(method.get(method["type"], {}).get("hyperparameters", {}))
    if hyper.get("n_epochs", "auto") == "auto":
        hyper["n_epochs"] = default_epochs(n_examples)
    if hyper.get("batch_size", "auto") == "auto":
        hyper["batch_size"] = auto_batch_size(n_examples)
    if hyper.get("learning_rate_multiplier", "auto") == "auto":
        hyper["learning_rate_multiplier"] = auto_learning_rate_multiplier(n_examples, hyper["batch_size"])
    if method["type"] == "dpo" and hyper.get("beta", "auto") in ("auto", None):
        hyper["beta"] = 0.1
    return hyper


def with_hyperparameters(method: dict, hyper: dict) -> dict:
    """The job's method with its resolved hyperparameters in place (what the job object reports)."""
    return {**method, method["type"]: {**method.get(method["type"], {}), "hyperparameters": hyper}}
