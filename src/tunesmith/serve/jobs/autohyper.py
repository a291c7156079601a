"""'auto' fine-tuning hyperparameters, resolved to the numbers a job trains with (reported on the job).

Epochs follow OpenAI's rule (3 passes; more for files under 34 examples, so that a file of a dozen examples
is seen about 100 times). The batch grows with the file (a step per example for small files, up to 8), and
the learning rate multiplier follows the batch by the square-root rule, so the noise of one step stays about
the same whatever the file size; the base rate is LoRA's usual 2e-4. The trainer then fits the micro-batch to
the model and the device's memory (gradient accumulation keeps this batch). Measured on 12-, 50- and
500-example label files: docs/results.md, "Fine-tuning jobs: 'auto' hyperparameters".
"""

from __future__ import annotations

import math

LR_BASE = 2e-4  # multiplied by learning_rate_multiplier (1.0: the rate LoRA recipes use by default)


def auto_batch_size(n_examples: int) -> int:
    """A power of two near n/64, from 1 to 8: small files take a step per example."""
    return max(1, min(8, 2 ** int(math.log2(max(1, n_examples // 64)))))


def auto_learning_rate_multiplier(batch_size: int) -> float:
    """The square root of the batch: a batch of 4 averages away half the noise and takes a step twice as large."""
    return round(math.sqrt(batch_size), 2)


def resolve_hyperparameters(method: dict, n_examples: int) -> dict:
    """The method's hyperparameters with every 'auto' (or missing) value replaced by the number used."""
    from tunesmith.data.formats.validate import default_epochs

    hyper = dict(method.get(method["type"], {}).get("hyperparameters", {}))
    if hyper.get("n_epochs", "auto") == "auto":
        hyper["n_epochs"] = default_epochs(n_examples)
    if hyper.get("batch_size", "auto") == "auto":
        hyper["batch_size"] = auto_batch_size(n_examples)
    if hyper.get("learning_rate_multiplier", "auto") == "auto":
        hyper["learning_rate_multiplier"] = auto_learning_rate_multiplier(hyper["batch_size"])
    if method["type"] == "dpo" and hyper.get("beta", "auto") in ("auto", None):
        hyper["beta"] = 0.1
    return hyper


def with_hyperparameters(method: dict, hyper: dict) -> dict:
    """The job's method with its resolved hyperparameters in place (what the job object reports)."""
    return {**method, method["type"]: {**method.get(method["type"], {}), "hyperparameters": hyper}}
