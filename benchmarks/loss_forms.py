"""The SFT loss three ways, on the same packed batch of real rows: time and peak memory of a training step.

- ``chunked`` (tunesmith's default, :mod:`tunesmith.train.chunked_loss`): the target positions picked by
  integer index and scored in vocabulary tiles with TRL's chunked log-probability kernel; no logits held;
- ``logits`` (``train.loss: logits``): the model's own forward asked for logits at the target positions only
  (``logits_to_keep`` with a boolean mask), then cross-entropy;
- ``transformers`` (the peer: what plain TRL ``SFTTrainer`` computes): the model's forward with ``labels``,
  -100 on the prompt, logits over every position of the batch.

Rows: the Stanford Alpaca demo tasks from ``../shared/data`` as chat prompt/completion rows, the first
``--examples``, packed by tunesmith's collator (the same batch for every side). Models: the embedded
SmolLM2-135M-Instruct (49,152-token vocabulary, real weights) and Llama-3.2-1B's architecture with random
weights cut to ``--layers`` layers (its 128,256-token vocabulary and 2,048 width kept: the loss's cost is
the vocabulary's). LoRA r=16 on every linear layer, fp32 on a CPU (bf16 on a GPU). Per side: the median step
(forward + backward) over ``--steps`` after one warm-up, the peak memory of the step above the level before
it (resident peak on a CPU, allocator peak on a GPU), and the loss (the three must agree).

    python benchmarks/loss_forms.py --examples 16 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

SHARED = Path(os.environ.get("TUNESMITH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SIDES = ("chunked", "logits", "transformers")


def alpaca_rows(n: int) -> list[dict]:
    raw = json.loads((SHARED / "instructions" / "llamafactory_alpaca_en_demo.json").read_text())
    return [{"prompt": [{"role": "user", "content": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")}],
             "completion": [{"role": "assistant", "content": r["output"]}]} for r in raw[:n]]


def load(name: str, device: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.models.names import resolve

    folder = resolve(name)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    if name.startswith("random:"):
        from transformers import AutoConfig

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(model.to(device), lora).train(), AutoTokenizer.from_pretrained(folder)


def batch_of(rows, tokenizer, max_len: int, device: str) -> dict:
    from tunesmith.data.formats.chat_rows import tokenize_rows
    from tunesmith.machine.packing import PackedCollator

    feats = [f for f in tokenize_rows(rows, tokenizer) if f["length"] <= max_len]
    batch = PackedCollator(tokenizer.pad_token_id, mask_kind="bool", capacity=max_len)(feats)
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def step(model, batch: dict, side: str):
    import torch

    from tunesmith.train.trainer import completion_loss

    if side == "transformers":
        labels = torch.full_like(batch["input_ids"], -100)
        flat = labels.view(-1)
        flat[batch["target_index"] + 1] = batch["labels"]  # position p predicts p+1: the label sits at p+1
        loss = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     attention_mask=batch["attention_mask"], labels=labels, use_cache=False).loss
    else:
        loss, _, _ = completion_loss(model, dict(batch), form=side)
    loss.backward()
    return loss.detach()


def measure(model, batch: dict, side: str, steps: int, device: str) -> dict:
    import torch

    from tunesmith.machine.memory import peak_rss, reset_peak_rss

    def one():
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = reset_peak_rss()
        start = time.perf_counter()
        loss = step(model, batch, side)
        if device == "cuda":
            torch.cuda.synchronize()
        took = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss()) - before
        return took, peak, float(loss)

    one()  # warm-up
    runs = [one() for _ in range(steps)]
    return {"step_s": statistics.median(r[0] for r in runs), "peak_mb": max(r[1] for r in runs) / 2**20,
            "loss": runs[-1][2]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=2048, help="tokens per packed row")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=2, help="layers of the random Llama-3.2-1B")
    parser.add_argument("--models", default="smollm2-135m-instruct,random:llama-3.2-1b")
    args = parser.parse_args(argv)

    import torch

    from tunesmith.train.chunked_loss import add_target_head

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = alpaca_rows(args.examples)
    print("| model | vocabulary | rows x tokens | targets | side | step s | peak MB | loss | step vs transformers "
          "| peak vs transformers |\n|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        spec = f"{name}{'&' if '?' in name else '?'}layers={args.layers}" if name.startswith("random:") else name
        model, tok = load(spec, device)
        add_target_head(model)
        batch = batch_of(rows, tok, args.max_len, device)
        results = {side: measure(model, batch, side, args.steps, device) for side in SIDES}
        peer = results["transformers"]
        shape = "x".join(str(d) for d in batch["input_ids"].shape)
        vocab = model.get_base_model().config.vocab_size
        for side, r in results.items():
            print(f"| {spec} | {vocab:,} | {shape} | {len(batch['labels']):,} | {side} | {r['step_s']:.2f} | "
                  f"{r['peak_mb']:,.0f} | {r['loss']:.4f} | {peer['step_s'] / r['step_s']:.2f}x faster | "
                  f"{peer['peak_mb'] / max(r['peak_mb'], 1):.1f}x less |", flush=True)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
