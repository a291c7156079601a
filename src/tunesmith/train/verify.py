"""The check that decides whether a GPU kind takes tunesmith's fast training path by default, and the only writer
of its record (``gpu_verified.json``, read by :mod:`tunesmith.machine.verified`, whose rule it applies).

It runs, on this machine's device, what the fast path claims, and records what it measured:

1. **Packed equals one at a time.** Real examples packed into rows on the variable-length kernel the fast path uses
   (PyTorch's ``varlen_attn`` on a GPU) give each example the log-probabilities, the summed loss and every gradient
   that the same examples give one at a time on the model's own attention, within the tolerances of
   :data:`TOLERANCES` for the dtype. A control shows the check can fail: told that a packed row is one sequence,
   the same kernel must move the log-probabilities by more than twice the tolerance (examples that see each other).
2. **Faster than the named baseline.** Every example, micro-batch by micro-batch (file order, at most a row's
   tokens each), forward and backward: packed into one row against the same examples in padded rows on SDPA with
   transformers' own loss over every logit (how TRL's ``SFTTrainer`` defaults collate and score), both timed here,
   real tokens per second.
3. **The GPU tests' log**, where given (pytest's summary line): any failed test is a finding.

A GPU kind is verified only when the kernel named ran, 1–3 hold and the speed-up is at least 1. Shape: a random
Llama as wide as Llama-3.2-1B (2,048 hidden, 32 heads, 8 key/value heads, 8,192 MLP; 4 layers) in bf16, rows of
4,096 tokens; ``--smoke`` runs a 2-layer, 64-wide fp32 model on the CPU's kernel (the tests run it). The examples:
``--examples``, a CSV of messages and intents (default: the repository's BANKING77 sample) or instruction records
(``scripts/gpu_run.sh verify`` gives the kit's LLaMA-Factory Alpaca demo: the lengths a fine-tuning run meets; on
35-token BANKING77 messages of nearly one length padding costs little, and an H200 measured the fast path 0.86x).

    python -m tunesmith.train.verify --tokenizer DIR [--tests-log LOG] [--record PATH] [--smoke]
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tunesmith.machine.verified import WRITER, verdict

EXAMPLES_CSV = Path(__file__).resolve().parents[3] / "examples" / "data" / "banking77_10intents.csv"
BASELINE = "padded rows on SDPA, transformers' loss over all logits (TRL SFTTrainer's default collation)"


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    mlp: int
    dtype: str
    capacity: int  # tokens per packed row
    examples: int


FULL = Shape(layers=4, hidden=2048, heads=32, kv_heads=8, mlp=8192, dtype="bfloat16", capacity=4096, examples=128)
SMOKE = Shape(layers=2, hidden=64, heads=4, kv_heads=2, mlp=128, dtype="float32", capacity=1024, examples=12)


@dataclass(frozen=True)
class Tolerance:
    logprob: float  # mean absolute difference of the targets' log-probabilities
    loss: float  # relative difference of the summed loss
    grad: float  # largest difference of a parameter's gradient over that gradient's largest entry


# fp32: the CPU tests' bounds (a leak moves the loss by ~4e-4 relative there); half precision: one rounding step of
# the dtype on each side (fp16 0.001 and bf16 0.002 mean on the GPU tests' model), with room
TOLERANCES = {"float32": Tolerance(1e-4, 1e-5, 1e-3), "float16": Tolerance(5e-3, 2e-3, 3e-2),
              "bfloat16": Tolerance(1e-2, 4e-3, 5e-2)}


def conversations(tokenizer, count: int, path: Path = EXAMPLES_CSV, longest: int | None = None) -> list[dict]:
    """The first ``count`` examples of ``path`` (of at most ``longest`` tokens), tokenized as conversations: a CSV
    with ``text`` and ``category`` columns (the message asked, its intent answered), or a JSON / JSON Lines file of
    instruction records (``instruction``, optional ``input``, ``output``: Alpaca's format). Read by the data
    stage's reader, so a malformed row is an error naming its file and line."""
    from tunesmith.data.formats.chat_rows import tokenize_example
    from tunesmith.data.read.readers import read_records

    if not path.is_file():
        raise SystemExit(f"{path}: no such file; give --examples a CSV with text and category columns, or a JSON file "
                         "of instruction/input/output records")
    out = []
    for record in read_records(path)[0]:
        try:
            prompt, answer = _conversation(record.data, csv=path.suffix == ".csv")
        except KeyError as exc:
            raise SystemExit(f"{record.source}: no {exc.args[0]!r} field; --examples wants text and category "
                             "(CSV), or instruction and output") from None
        example = tokenize_example(prompt, [{"role": "assistant", "content": answer}], tokenizer)
        if longest is None or len(example["input_ids"]) <= longest:
            out.append(example)
        if len(out) == count:
            break
    return out


def _conversation(row: dict, csv: bool) -> tuple[list[dict], str]:
    """(prompt messages, answer) of a BANKING77 row (CSV) or an instruction record."""
    if csv:
        return [{"role": "system", "content": "Classify."}, {"role": "user", "content": row["text"]}], row["category"]
    ask = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return [{"role": "user", "content": ask}], row["output"]


def random_llama(shape: Shape, vocab: int, device: str):
    """A seeded random Llama of ``shape`` with the chunked-loss head the fast path trains through."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.train.chunked_loss import add_target_head

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         intermediate_size=shape.mlp, max_position_embeddings=max(shape.capacity, 2048),
                         tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(device=device, dtype=getattr(torch, shape.dtype))
    add_target_head(model)
    return model


def _targets(model, batch: dict, kernel: str | None):
    """The targets' log-probabilities (batch order, fp32) and the gradients of their summed negative, on the
    variable-length kernel (``kernel``) or on the model's own attention (None)."""
    from contextlib import nullcontext

    from tunesmith.machine import varlen

    batch = _on(model, batch)
    inputs = {k: v for k, v in batch.items()
              if k not in ("labels", "shift_labels", "num_tokens", "logits_mask", "target_index")}
    with varlen.varlen_attention(model, kernel) if kernel else nullcontext():
        out = model(**inputs, target_index=batch["target_index"], target_labels=batch["labels"])
        (-out.log_probs.float().sum()).backward()
    grads = {k: p.grad.float().clone() for k, p in model.named_parameters()}
    model.zero_grad()
    return out.log_probs.detach().float(), grads


def packing_order(features: list[dict], capacity: int) -> list[int]:
    """The examples in the order the packing collator lays out their targets."""
    from tunesmith.machine.packing import first_fit_decreasing

    lengths = [len(f["input_ids"]) for f in features]
    return [i for row in first_fit_decreasing(lengths, max(max(lengths), capacity)) for i in row]


def equality(model, features: list[dict], pad_id: int, capacity: int, kernel: str) -> dict:
    """Packed on ``kernel`` against one at a time: the differences, the kernel calls that ran, and the control."""
    import torch

    from tunesmith.machine import varlen
    from tunesmith.machine.packing import PackedCollator

    packed_batch = PackedCollator(pad_id, mask_kind="varlen", capacity=capacity)(features)
    varlen.STATE.used.clear()
    packed, packed_grads = _targets(model, packed_batch, kernel)
    used = dict(varlen.STATE.used)
    alone_parts, alone_grads = {}, None
    for i, f in enumerate(features):
        lp, grads = _targets(model, PackedCollator(pad_id, pack=False, mask_kind="none")([f]), None)
        alone_parts[i] = lp
        alone_grads = grads if alone_grads is None else {k: alone_grads[k] + g for k, g in grads.items()}
    alone = torch.cat([alone_parts[i] for i in packing_order(features, capacity)])
    rows, width = packed_batch["input_ids"].shape
    whole = torch.arange(rows + 1, dtype=torch.int32) * width  # each row told it is one sequence
    leaky_batch = packed_batch | {"cu_seq_lens_q": whole, "cu_seq_lens_k": whole, "max_length_q": width,
                                  "max_length_k": width}
    leak = (_targets(model, leaky_batch, kernel)[0] - alone).abs().mean().item()
    grad = max(((packed_grads[k] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item()
               for k, g in alone_grads.items())
    return {"kernel_calls": used, "targets": int(packed.numel()), "packed_rows": rows,
            "logprob_mean_abs_diff": (packed - alone).abs().mean().item(),
            "loss_rel_diff": abs(packed.sum().item() - alone.sum().item()) / abs(alone.sum().item()),
            "grad_rel_diff": grad, "leak_logprob_mean_abs_diff": leak}


def micro_batches(features: list[dict], capacity: int) -> list[list[dict]]:
    """The examples in file order, cut into micro-batches of at most ``capacity`` real tokens: one packed row each
    on the fast path, padded rows of the same examples on the baseline."""
    groups: list[list[dict]] = [[]]
    used = 0  # real tokens in the last micro-batch
    for f in features:
        if groups[-1] and used + len(f["input_ids"]) > capacity:
            groups.append([])
            used = 0
        groups[-1].append(f)
        used += len(f["input_ids"])
    return groups


def speed(model, features: list[dict], pad_id: int, capacity: int, kernel: str, passes: int = 3) -> dict:
    """Real tokens per second over every example, micro-batch by micro-batch (forward and backward), packed on
    ``kernel`` and in the baseline's padded rows: the same examples in the same micro-batches on both sides."""
    from tunesmith.machine import varlen
    from tunesmith.machine.packing import PackedCollator
    from tunesmith.train.trainer import completion_loss

    tokens = sum(len(f["input_ids"]) for f in features)
    groups = micro_batches(features, capacity)
    packed = [PackedCollator(pad_id, mask_kind="varlen", capacity=capacity)(g) for g in groups]
    padded = [padded_batch(g, pad_id) for g in groups]

    def fast():
        for batch in packed:
            completion_loss(model, _on(model, batch), num_items_in_batch=1, form="chunked")[0].backward()

    def baseline():
        for batch in padded:
            model(**_on(model, batch)).loss.backward()

    with varlen.varlen_attention(model, kernel):  # the trainer switches the attention once, for all its steps
        fast_s = _timed(fast, passes)
    return {"tokens": tokens, "micro_batches": len(groups), "fast_tokens_s": tokens / fast_s,
            "baseline": BASELINE, "baseline_padded_tokens": sum(int(b["input_ids"].numel()) for b in padded),
            "baseline_tokens_s": tokens / _timed(baseline, passes)}


def padded_batch(features: list[dict], pad_id: int) -> dict:
    """The examples in rows padded to the longest, labels only on the completion (-100 elsewhere)."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for r, f in enumerate(features):
        n = len(f["input_ids"])
        ids[r, :n], mask[r, :n] = torch.tensor(f["input_ids"]), 1
        labels[r, :n] = torch.where(torch.tensor(f["completion_mask"], dtype=torch.bool), ids[r, :n], -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _on(model, batch: dict) -> dict:
    device = next(model.parameters()).device
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def _timed(step, steps: int, warmup: int = 1) -> float:
    """Seconds per step after ``warmup`` steps (the device synchronised around the timed ones)."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def test_failures(log: str) -> tuple[int, int] | None:
    """(passed, failed + errors) from pytest's last summary line in ``log``, None when it has none."""
    lines = [ln for ln in log.splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    if not lines:
        return None
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?)", lines[-1])}
    return counts.get("passed", 0), counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)


def run(tokenizer_dir: str, shape: Shape = FULL, tests_log: Path | None = None,
        examples: Path = EXAMPLES_CSV) -> tuple[str, dict]:
    """Run the check on this machine's device; returns (device name, evidence)."""
    import torch
    from transformers import AutoTokenizer

    cuda = torch.cuda.is_available()
    device, kernel = ("cuda", "torch") if cuda else ("cpu", "sdpa")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    features = conversations(tok, shape.examples, examples, longest=shape.capacity)
    model = random_llama(shape, len(tok), device)
    tolerance = TOLERANCES[shape.dtype]
    evidence = {"written_by": WRITER, "date": time.strftime("%Y-%m-%d"), "kernel": kernel, "shape": asdict(shape),
                "torch": torch.__version__, "tolerance": asdict(tolerance),
                "equality": equality(model, features, pad_id, shape.capacity, kernel),
                "speed": speed(model, features, pad_id, shape.capacity, kernel)}
    evidence["speed"]["speedup"] = evidence["speed"]["fast_tokens_s"] / evidence["speed"]["baseline_tokens_s"]
    if tests_log is not None:
        found = test_failures(tests_log.read_text(encoding="utf-8", errors="replace"))
        passed, failed = found if found else (0, 1)  # a log without a summary: the tests did not finish
        evidence["tests"] = {"log": tests_log.name, "passed": passed, "failed": failed}
    finding = verdict(evidence)
    evidence["verified"] = finding is None
    if finding:
        evidence["finding"] = finding
    return (torch.cuda.get_device_name() if cuda else "cpu"), evidence


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    from tunesmith.machine import verified

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="a tokenizer folder (the kit's, on a GPU machine)")
    ap.add_argument("--tests-log", type=Path, help="the GPU tests' log: a failed test is a finding")
    ap.add_argument("--record", type=Path, help=f"the records file (default {verified.RECORDS})")
    ap.add_argument("--examples", type=Path, default=EXAMPLES_CSV,
                    help="a CSV with text and category columns, or a JSON / JSON Lines file of instruction, input and "
                         "output records (default: the repository's BANKING77 sample)")
    ap.add_argument("--smoke", action="store_true", help="the small fp32 shape (CPU tests)")
    args = ap.parse_args(argv)
    name, evidence = run(args.tokenizer, SMOKE if args.smoke else FULL, args.tests_log, args.examples)
    verified.write(name, evidence, args.record)
    print(json.dumps({name: evidence}, indent=2))
    print(f"{name}: {'verified' if evidence['verified'] else 'not verified: ' + evidence['finding']}")


if __name__ == "__main__":
    main()
