"""What autograd keeps per token and layer while training, measured, beside the memory estimator's formula.

One forward pass of the embedded SmolLM2-135M (fp32, a 4D causal mask, as the collator builds it) under
``torch.autograd.graph.saved_tensors_hooks``: every tensor saved for backward is counted once (by its
storage), divided by tokens x layers. Printed per variant (full fine-tuning, LoRA r=16 without and with
dropout; the causal LM and the span head) with :func:`tunesmith.machine.estimate.activation_floats`'s
prediction and the ratio. The estimator's backward working memory (25% on top) is not measured here: it
comes from the resident peaks of real trainings (docs/train.md, "Memory estimate").

    PYTHONPATH=src python benchmarks/activation_memory.py [--rows 2] [--length 384]
"""

from __future__ import annotations

import argparse
import collections
import resource


def saved_bytes(model, rows: int, length: int, span: bool) -> tuple[int, collections.Counter]:
    """Bytes of the distinct storages autograd saves during one forward pass, and bytes by last dimension."""
    import torch

    ids = torch.randint(0, 40_000, (rows, length))
    mask = torch.ones(rows, 1, length, length, dtype=torch.bool).tril()
    seen: dict = {}
    by_width: collections.Counter = collections.Counter()

    def keep(t):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen[key] = storage.nbytes()
            by_width[t.shape[-1] if t.dim() else 0] += storage.nbytes()
        return t

    extra = {"start_positions": torch.zeros(rows, dtype=torch.long),
             "end_positions": torch.zeros(rows, dtype=torch.long)} if span else {}
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(input_ids=ids, attention_mask=mask, **extra)
    return sum(seen.values()), by_width


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--length", type=int, default=384)
    args = ap.parse_args()

    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForQuestionAnswering
    from transformers.utils import logging as hf_logging

    from tunesmith.config import LoraSection, TrainSection
    from tunesmith.machine.estimate import activation_floats, model_shape
    from tunesmith.models.loading import wrap_adapter
    from tunesmith.models.names import resolve

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    ref = resolve("smollm2-135m-instruct")
    shape = model_shape(__import__("pathlib").Path(ref))
    print(f"load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}; SmolLM2-135M (hidden {shape.hidden}, "
          f"kv {shape.kv_dim}, intermediate {shape.intermediate}, {shape.layers} layers); "
          f"{args.rows} rows x {args.length} tokens, fp32")
    print("| model | adapter | measured KB / token-layer | estimator KB | estimator / measured |")
    print("|---|---|---:|---:|---:|")
    for span in (False, True):
        for adapter, dropout in (("full", 0.0), ("lora", 0.0), ("lora", 0.05)):
            auto = AutoModelForQuestionAnswering if span else AutoModelForCausalLM
            model = auto.from_pretrained(ref, dtype=torch.float32)
            lora = LoraSection(r=16, alpha=32, dropout=dropout, target_modules="all-linear")
            if adapter == "lora":
                model = wrap_adapter(model, "lora", lora, 0, task_type="QUESTION_ANS" if span else "CAUSAL_LM")
            model.train()
            total, by_width = saved_bytes(model, args.rows, args.length, span)
            # the causal LM's vocabulary logits are the estimator's "logits" part, not activations
            total -= 0 if span else by_width.get(shape.vocab, 0)
            measured = total / (args.rows * args.length * shape.layers) / 1024
            t = TrainSection(adapter=adapter, lora=lora, head="span" if span else "generative")
            predicted = activation_floats(shape, t) * 4 / 1024
            name = "span head" if span else "causal LM"
            label = adapter + (f", dropout {dropout}" if adapter == "lora" else "")
            print(f"| {name} | {label} | {measured:.1f} | {predicted:.1f} | {predicted / measured:.2f} |", flush=True)
            del model
    print(f"peak resident {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")


if __name__ == "__main__":
    main()
