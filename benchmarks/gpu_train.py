"""GPU training: tunesmith's chosen path vs plain TRL (and Unsloth where its part is carried), at the sizes teams train.

One run per configuration, each side after the other, each in its own process with its own time limit (a side that
fails or runs out of time costs its row only), on the same rows: BANKING77 messages, the Stanford Alpaca seed tasks
and KorQuAD questions with their contexts from ``../shared/data`` (a source that is absent is skipped with a printed
note), as chat prompt/completion rows with the loss on the completion. Models are architecture-faithful with seeded
random weights (``random:<arch>``: nothing is downloaded), so every side starts from the same weights and the same
seeded LoRA (r=16, alpha=32, all linear layers).

Each step takes about ``--tokens-per-step`` (16,384) real tokens: the examples per step are that over the rows' mean
length, split into ``--accum`` micro-steps (per configuration by default) that every side takes alike.

- tunesmith: the path :func:`tunesmith.machine.path.take_path` takes on this machine (printed): on a GPU packed
  rows on tunesmith's variable-length attention (:mod:`tunesmith.machine.varlen`: PyTorch's ``varlen_attn`` where
  torch has it, each micro-batch one row without padding), gradient checkpointing as the product's ``auto`` rule
  decides; and "tunesmith, checkpointing off" where the configuration's micro-batch fits without it (the memory
  price of the speed, beside);
- TRL: ``SFTTrainer`` with its defaults (bf16 and gradient checkpointing on a GPU, no packing, no kernels; on a CPU
  bf16 is switched off, as it is unusable there), the same examples per micro-step padded to the longest; and
  "TRL tuned": no gradient checkpointing, ``padding_free`` rows (SDPA keeps the examples apart by their position
  ids), Liger's kernels where installed on a GPU;
- tunesmith's reference path (``--reference``): ``train.path: reference``, the product's plain TRL ``SFTTrainer`` /
  ``DPOTrainer`` and transformers' ``Trainer`` for the head (:mod:`tunesmith.train.reference`) on that path's
  settings: the switch a user falls back on;
- Unsloth (where it is installed, or in ``--unsloth-site`` with the versions it pins): ``FastLanguageModel`` with
  the same LoRA shape under the same TRL trainer settings, with its default offloaded gradient checkpointing and
  with checkpointing not offloaded.

Every side prints its real and its computed-on (rows x width) tokens per step. The loss check: every side's losses
at the first three steps (the same weights and examples everywhere, so only how a side computes the loss and its
gradient differs) against tunesmith's, each within 1e-2 relative on a GPU (bf16) and 2e-3 on a CPU; a side outside
it is a failure of the run. With random weights the first step's loss is near log(vocabulary) whatever a side
computes, so the later steps catch a wrong loss or gradient (a shifted label, a prompt token counted, another
normalisation); examples that see each other are ``scripts/gpu_run.sh verify``'s (:mod:`tunesmith.train.verify`).
At least 10 steps are timed after ``--warmup``; with ``--profile`` one more step runs, profiled and not timed.

Each side runs in a fresh Python process (its own CUDA context, allocator peak and module state: Liger patches
transformers' rotary embedding module-wide, and Unsloth much more, which in one process would reach the sides
after it), stopped after ``--side-timeout`` seconds or when ``--deadline`` (the whole run's seconds) runs out.
First the device's dense matmul peak is measured (bf16 on a GPU, fp32 on a CPU). Reported per side: tokens/s (real
tokens over the steps after ``--warmup``, so compilation and the allocator's first growth are not counted), MFU =
6·N·tokens/s over the sheet's bf16 dense peak (:data:`SHEET_PEAKS`; over the measured peak in brackets), N without
the input embedding (a lookup, no matmul; kept when the head shares its weight), a 4-bit weight at its unquantised
count, attention's FLOPs not counted (NeMo AutoModel's and the published figures' convention); a LoRA side adds the
4·N figure (its frozen weights take no weight gradient), peak memory (CUDA allocator peak; on a CPU the resident-set
peak above the level before training) beside the memory estimator's for tunesmith's largest micro-batch of the run,
the training loss at the last step and over the last quarter of steps (the sides must agree), the host syncs per
training step with the lines that made them (:mod:`tunesmith.machine.syncs`: PyTorch's own check of synchronising
operations on a GPU, reads of tensor values on a CPU), the mean step time, and with ``--profile`` the top kernels
and the GPU busy fraction of the last step, the only one profiled (the union of its GPU kernels' intervals over
their span). The clock waits for the device only after the warm-up steps and after the last step, so it adds no sync
of its own to the steps between. ``--attention sdpa,auto`` measures tunesmith's side once per attention choice
(``sdpa``: the variable-length path on SDPA's masked kernel; ``auto``: the path's own choice).

Configurations: ``1b-lora`` (Llama-3.2-1B, LoRA, bf16), ``8b-lora`` (Llama-3.1-8B), ``8b-qlora`` (Llama-3.1-8B,
4-bit NF4; tunesmith's side planned for an 8 GB GPU and held to it, ``train.memory_limit_gb: 8``, so its estimator
turns gradient checkpointing on, as TRL's defaults always do), ``2b-full`` (Gemma-2-2B, full fine-tuning),
``1b-head`` (Llama-3.2-1B with the classifier head on BANKING77 vs TRL SFT on the same messages), ``1b-dpo``
(Llama-3.2-1B, LoRA DPO on LLaMA-Factory's 300 demo pairs, the reference being the adapter switched off:
tunesmith's sync-free DPO trainer vs plain TRL ``DPOTrainer`` defaults; tokens are the real tokens of the chosen
and rejected sequences, once each), ``1b-grpo`` (Llama-3.2-1B, LoRA GRPO: tunesmith's vs plain TRL
``GRPOTrainer``, the step split into rollout, reward and update; ``benchmarks/gpu_grpo.py``). ``--smoke`` shrinks
every model (2 layers, hidden 64), the rows, the steps and the tokens per step so that the whole script runs on a
CPU in about a minute per configuration; ``--tiny`` shrinks the models only.

    python benchmarks/gpu_train.py --tokenizer PATH --configs 1b-lora,1b-dpo,1b-grpo,1b-head --reference --deadline 480
    python benchmarks/gpu_train.py --tokenizer PATH --configs 8b-lora,8b-qlora,2b-full --steps 8 --profile
    python benchmarks/gpu_train.py --smoke                              # CPU smoke run
"""

from __future__ import annotations

import argparse
import csv
import functools
import gc
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

STARTED = time.perf_counter()  # this process's start: a side's progress lines say where its time went
SHARED = Path(os.environ.get("TUNESMITH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SYSTEM_BANKING = "Classify the banking customer message by intent."
BANKING = SHARED / "banking77" / "banking77_train.csv"
DPO_PAIRS = SHARED / "preference" / "llamafactory_dpo_en_demo.json"


@dataclass(frozen=True)
class Config:
    name: str
    arch: str
    adapter: str  # lora | qlora | full
    head: str = "generative"
    method: str = "sft"  # sft | dpo | grpo
    memory_gb: float | None = None  # tunesmith's train.memory_limit_gb: the GPU size its path is planned for
    accum: int = 1  # micro-steps per step (every side alike; --accum overrides): what fits each side's memory
    # tunesmith's train.gradient_checkpointing (--checkpointing overrides): auto is the product's rule, the estimate
    # for batch x max_seq_length tokens, which packed rows of ~500-token examples never reach (1B LoRA: 94.5 GB
    # estimated, 24 GB at the micro-batch's real tokens); off where the real micro-batch fits an 80 GB GPU
    checkpointing: str = "auto"


CONFIGS = {c.name: c for c in [
    Config("1b-lora", "llama-3.2-1b", "lora", accum=2, checkpointing="off"),
    Config("8b-lora", "llama-3.1-8b", "lora", accum=8, checkpointing="off"),
    Config("8b-qlora", "llama-3.1-8b", "qlora", memory_gb=8, accum=8),
    Config("2b-full", "gemma-2-2b", "full", accum=4),
    Config("1b-head", "llama-3.2-1b", "lora", head="classifier", checkpointing="off"),
    Config("1b-dpo", "llama-3.2-1b", "lora", method="dpo", accum=4, checkpointing="off"),
    Config("1b-grpo", "llama-3.2-1b", "lora", method="grpo", accum=4, checkpointing="off"),
]}
GROUPS = {"1b": "1b-lora,1b-dpo,1b-grpo,1b-head", "8b": "8b-lora,8b-qlora,2b-full"}  # one GPU command each


def split(examples: int, cfg: Config, args) -> tuple[int, int]:
    """(examples per micro-step, micro-steps) of a step of ``examples``: ``--accum`` or the configuration's."""
    accum = max(1, min(args.accum or cfg.accum, examples))
    return max(1, examples // accum), accum


# --- the device ---------------------------------------------------------------------------------------
def matmul_peak(device: str) -> tuple[float, str]:
    """Best dense matmul rate (FLOP/s) of square matrices: bf16 on a GPU, fp32 on a CPU."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = 8192 if device == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(10):
        _sync(device)
        start = time.perf_counter()
        reps = 20 if device == "cuda" else 3
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, reps * 2 * n**3 / (time.perf_counter() - start))
    del a, b
    if device == "cuda":
        torch.cuda.empty_cache()  # the sides run in their own processes: leave them the memory
    return best, str(dtype).replace("torch.", "")


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# --- the rows -----------------------------------------------------------------------------------------
def load_rows(limit_per_source: int, seed: int) -> tuple[list[dict], list[tuple[str, str]]]:
    """Chat prompt/completion rows from the shared sources that are present, and the BANKING77 (text, intent)
    pairs (for the classifier head). Absent sources are skipped with a note."""
    rng = random.Random(seed)
    rows, banking = [], []
    path = BANKING
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as fh:
            banking = [(r["text"], r["category"]) for r in csv.DictReader(fh)]
        rng.shuffle(banking)  # all of them for the head, whose steps take hundreds of short messages
        rows += [_row([("system", SYSTEM_BANKING), ("user", t)], label) for t, label in banking[:limit_per_source]]
    else:
        print(f"note: {path} is absent; BANKING77 skipped")
    path = SHARED / "instructions" / "stanford_alpaca_seed_tasks.jsonl"
    if path.is_file():
        tasks = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for t in tasks[:limit_per_source]:
            inst = t["instances"][0]
            user = t["instruction"] + (f"\n\n{inst['input']}" if inst["input"] else "")
            rows.append(_row([("user", user)], inst["output"]))
    else:
        print(f"note: {path} is absent; Alpaca seed tasks skipped")
    path = SHARED / "korquad" / "korquad_v1_dev_shared.json"
    if path.is_file():
        doc = json.loads(path.read_text(encoding="utf-8"))
        qa = [(p["context"], q["question"], q["answers"][0]["text"])
              for art in doc["data"] for p in art["paragraphs"] for q in p["qas"][:1]]
        rng.shuffle(qa)
        rows += [_row([("system", "Answer from the context."), ("user", f"{c}\n\nQuestion: {q}")], a)
                 for c, q, a in qa[:limit_per_source]]
    else:
        print(f"note: {path} is absent; KorQuAD skipped")
    if not rows:
        raise SystemExit(f"no source found under {SHARED} (set TUNESMITH_SHARED_DATA)")
    rng.shuffle(rows)
    return rows, banking


def load_pairs(limit: int) -> list[dict]:
    """Preference pairs (LLaMA-Factory's DPO demo, read by tunesmith's reader) for the DPO configuration."""
    from tunesmith.train.dpo import read_pairs

    return read_pairs(DPO_PAIRS)[:limit]


def _row(turns: list[tuple[str, str]], answer: str) -> dict:
    return {"prompt": [{"role": r, "content": c} for r, c in turns],
            "completion": [{"role": "assistant", "content": answer}]}


# --- models -------------------------------------------------------------------------------------------
def model_name(cfg: Config, args) -> str:
    sizes = "layers=2&hidden=64&vocab=" + str(args.vocab) + "&" if args.tiny else ""
    return f"random:{cfg.arch}?{sizes}seed={args.seed}" + (f"&tokenizer={args.tokenizer}" if args.tokenizer else "")


def recipe_for(cfg: Config, args, out: Path, examples_per_step: int, attention: str = "auto", accum: int | None = None,
               checkpointing: str | None = None, **extra):
    """tunesmith's recipe for ``cfg``: ``examples_per_step`` split into the configuration's micro-steps (or
    ``accum`` of them); gradient checkpointing as ``checkpointing`` says (else ``--checkpointing``, else the
    configuration's)."""
    import tunesmith.kinds  # noqa: F401 - registers the task kinds the schema checks
    import tunesmith.train  # noqa: F401 - registers the training methods (their shapes and trainers)
    from tunesmith.config import validate_recipe

    batch, accum = split(examples_per_step, cfg, args) if accum is None else (examples_per_step // accum, accum)
    checkpointing = {"auto": "auto", "off": False, "on": True}[checkpointing or args.checkpointing or cfg.checkpointing]
    train = {"path": "fast"} | {"adapter": cfg.adapter, "head": cfg.head, "method": cfg.method, "max_steps": args.steps,
                     "batch_size": batch, "grad_accum": accum, "learning_rate": args.lr, "max_seq_length": args.seq_len,
                     "logging_steps": 1, "warmup_ratio": 0.0, "lr_scheduler": "constant", "attention": attention,
                     "memory_limit_gb": cfg.memory_gb, "gradient_checkpointing": checkpointing,
                     "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}} | extra
    return validate_recipe({"name": f"bench-{cfg.name}", "output_dir": str(out), "seed": args.seed,
                            "model": {"name": model_name(cfg, args)},
                            "data": {"path": "unused", "input_fields": ["text"], "target_field": "y"},
                            "train": train})


def count_params(model) -> int:
    """All parameters; a 4-bit weight counts its unquantised shape (bitsandbytes packs two per byte)."""
    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        total += state.shape.numel() if state is not None else p.numel()
    return total


def param_counts(model) -> dict:
    """``params`` (all) and ``params_compute``: without the input embedding, a lookup that does no matmul (kept
    when the output head shares its weight, since the head's matmul uses it)."""
    total = count_params(model)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.weight.data_ptr()
    return {"params": total, "params_compute": total if tied else total - embed.weight.numel()}


# bf16 dense tensor-core peaks from the vendors' sheets (FLOP/s, without sparsity), by the name torch reports
SHEET_PEAKS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100", 989e12),
               ("H200", 989e12), ("A100", 312e12))


def sheet_peak(device_name: str) -> float | None:
    """The sheet's bf16 dense peak of this GPU (None: a CPU or a GPU not in :data:`SHEET_PEAKS`)."""
    return next((flops for key, flops in SHEET_PEAKS if key in device_name), None)


def mfu_cell(cfg: str, r: dict, peak_flops: float, sheet_flops: float | None) -> str:
    """6·N·tokens/s over the sheet's peak (over the measured peak in brackets), N without the input embedding;
    for a LoRA side the 4·N figure beside it (frozen weights take no weight gradient). GRPO: mostly sampling, none."""
    rate = r["tokens_per_s"]
    if not rate or "phases" in r:
        return "–"
    n = r.get("params_compute", r["params"])
    pct = lambda flops, k: "–" if not flops else f"{100 * k * n * rate / flops:.1f}%"  # noqa: E731
    cell = f"{pct(sheet_flops, 6)} ({pct(peak_flops, 6)})"
    config = CONFIGS.get(cfg)
    if config is not None and config.adapter in ("lora", "qlora", "dora") and config.method == "sft":
        cell += f" · 4·N {pct(sheet_flops or peak_flops, 4)}"
    return cell


# --- measuring a trainer ------------------------------------------------------------------------------
def _clock(device: str, steps: int, warmup: int = 1, tokens=None):
    """A TrainerCallback that waits for the device only after step ``warmup`` and after the last step and
    notes (time, tokens seen) there: the rate over the steps between, without a sync in every step (which would
    hide the host syncs a side makes). ``tokens()`` gives the tokens seen (default: the Trainer state's count)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, int]] = []

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step not in (warmup, steps):
                return
            _sync(device)
            seen = tokens() if tokens else state.num_input_tokens_seen
            self.marks.append((time.perf_counter(), int(seen or 0)))

    return Clock()


def measure(train, device: str, steps: int, profile: bool, warmup: int = 1, tokens=None) -> dict:
    """Run ``train(callbacks)`` (a side's training, which must add the callbacks to its Trainer); return
    tokens/s over the steps after ``warmup``, the peak memory, host syncs per step (:class:`tunesmith.machine.syncs.StepReads`)
    and, with ``profile``, the top kernels and the GPU busy fraction of the last step (:func:`_profiled`)."""
    import torch

    from tunesmith.machine.memory import peak_rss, reset_peak_rss
    from tunesmith.machine.syncs import StepReads

    end = steps - 1 if profile else steps  # the profiled step (the last) is not timed
    clock = _clock(device, end, warmup, tokens)
    reads = StepReads(device)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = 0
    else:
        before = reset_peak_rss()
    start = time.perf_counter()
    print(f"  training starts {start - STARTED:.0f} s into the side's process", flush=True)
    with reads:
        if profile:
            result, top = _profiled(lambda extra: train([clock, reads.callback(), *extra]), device, steps)
        else:
            result, top = train([clock, reads.callback()]), None
    wall = time.perf_counter() - start
    print(f"  training took {wall:.0f} s", flush=True)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss() - before
    (t1, n1), (tn, nn) = clock.marks[0], clock.marks[-1]
    measured = end - warmup
    return {"result": result, "timed_steps": measured, "wall_s": wall, "tokens": nn,
            "tokens_per_s": (nn - n1) / (tn - t1) if tn > t1 else None,
            "step_s": (tn - t1) / measured if tn > t1 and measured > 0 else None,
            "peak_mb": peak / 2**20, "syncs_per_step": reads.per_step, "sync_sites": _top_sites(reads.sites),
            "profile": top}


def _top_sites(sites: list[str], n: int = 4) -> list[str]:
    from collections import Counter

    return [f"{site} ×{count}" for site, count in Counter(sites).most_common(n)]


def losses_of(log_history: list[dict]) -> dict:
    return _loss_summary([h["loss"] for h in log_history if "loss" in h])


def result_losses(result) -> list[float]:
    """The logged training losses of a tunesmith training's result (its metrics rows)."""
    return [r["train_loss"] for r in result.rows if r.get("train_loss") is not None]


CHECKED_STEPS = 3  # the loss check's steps: the first (same weights) and two after updates (same gradients?)


def _loss_summary(losses: list[float]) -> dict:
    """The losses of the first :data:`CHECKED_STEPS` steps (the same weights and examples on every side: the loss
    check), at the last step and over the last quarter of steps (the sides must agree)."""
    quarter = losses[-max(1, len(losses) // 4):]
    return {"first_losses": losses[:CHECKED_STEPS] or None, "last_loss": losses[-1] if losses else None,
            "late_loss": sum(quarter) / len(quarter) if quarter else None}


def _profiled(run, device: str, steps: int):
    """``run(callbacks)`` under torch.profiler recording the last of ``steps`` optimizer steps only (every measured
    step of an 8B model is millions of events, whose collection outran the steps); returns (its output, the top
    kernels of that step and its GPU busy fraction: the union of its kernels' intervals over the span from the
    first one's start to the last one's end)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import TrainerCallback

    class Step(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            prof.step()

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts, schedule=schedule(wait=max(steps - 1, 0), warmup=0, active=1, repeat=1)) as prof:
        out = run([Step()])
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = sorted((e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")),
                    key=lambda e: getattr(e, key, 0), reverse=True)
    top = [f"{e.key[:70]}: {getattr(e, key, 0) / 1e3:,.1f} ms" for e in events[:8]]
    kernels = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy = busy_fraction(kernels, (min(k[0] for k in kernels), max(k[1] for k in kernels))) if kernels else None
    return out, {"top": top, "busy_fraction": busy}


def busy_fraction(intervals: list[tuple[float, float]], window: tuple[float, float]) -> float:
    """The share of ``window`` covered by the union of ``intervals`` (kernels that overlap count once)."""
    lo, hi = window
    covered, reach = 0.0, lo
    for start, end in sorted(intervals):
        start, end = max(start, reach), min(end, hi)
        if end > start:
            covered += end - start
            reach = end
    return covered / (hi - lo) if hi > lo else 0.0


# --- the sides ----------------------------------------------------------------------------------------
def run_tunesmith(cfg: Config, args, rows, out: Path, examples_per_step: int, attention: str = "auto",
                  checkpointing: str | None = None) -> dict:
    from dataclasses import replace

    from tunesmith.machine.path import take_path
    from tunesmith.models.loading import load_model_for, load_tokenizer
    from tunesmith.models.random_weights import folder_for, save_weights
    from tunesmith.train.sft import build_trainer, one_row, prepare_model

    if cfg.adapter == "qlora":  # the 4-bit loader reads files: written once, before the process is held to its limit
        save_weights(folder_for(model_name(cfg, args)))
    recipe, path, placement = take_path(recipe_for(cfg, args, out, examples_per_step, attention,
                                                   checkpointing=checkpointing))
    tokenizer = load_tokenizer(recipe.model.name)
    tokenizer.padding_side = "right"
    model = prepare_model(recipe, load_model_for(recipe.model.name, placement, cfg.adapter))
    params = param_counts(model)
    trainer = build_trainer(recipe, model, tokenizer, rows, [], placement, out / "ours", save_strategy="no")
    if not one_row(path):  # rows filled up to --seq-len tokens (else each micro-batch is one row already)
        trainer.data_collator = replace(trainer.data_collator, capacity=args.seq_len)
    trainer.data_collator = largest = Largest(trainer.data_collator)
    res = measure(functools.partial(_train, trainer), placement.device, args.steps, args.profile, args.warmup)
    micro_tokens = largest.tokens or round(recipe.train.batch_size * args.mean_tokens)
    return res | losses_of(trainer.state.log_history) | largest.per_step(recipe.train.grad_accum) | {
        "largest_micro_tokens": largest.tokens, "steps": trainer.state.global_step, **params,
        "path": path.describe() + _micro(recipe),
        "estimate_mb": estimated_peak_mb(recipe, path, micro_tokens, args.seq_len, one_row(path))}


class Largest:
    """A collator that notes the real tokens of the largest micro-batch it made (the peak memory is reached there,
    so the estimate beside it is taken at that size: the mean micro-batch can be half of it, four ~480-token
    examples a micro-step drawn from rows of up to 2,048 tokens) and counts the real and the padded tokens of all
    (what each side's tokens/s is made of)."""

    def __init__(self, collate):
        self.collate, self.tokens, self.real, self.padded, self.batches = collate, 0, 0, 0, 0

    def __call__(self, features):
        real = sum(len(f["input_ids"]) for f in features)
        self.tokens = max(self.tokens, real)
        batch = self.collate(features)
        ids = batch.get("input_ids")
        if ids is not None:
            self.real, self.padded, self.batches = self.real + real, self.padded + ids.numel(), self.batches + 1
        return batch

    def per_step(self, accum: int) -> dict:
        """Mean real and padded (as computed on: rows x width) tokens of an optimizer step."""
        if not self.batches:
            return {}
        return {"real_tokens_per_step": self.real * accum / self.batches,
                "padded_tokens_per_step": self.padded * accum / self.batches}

    def __getattr__(self, name):  # everything else is the wrapped collator's
        if name == "collate":  # not set yet (a copy being made)
            raise AttributeError(name)
        return getattr(self.collate, name)


def _micro(recipe) -> str:
    t = recipe.train
    return f" · {t.batch_size} examples x {t.grad_accum} micro-steps per step"


def estimated_peak_mb(recipe, path, micro_tokens: int, seq_len: int, flat: bool) -> float:
    """The memory estimator's peak (:mod:`tunesmith.machine.estimate`) for a micro-batch of ``micro_tokens`` packed
    into one row (``flat``) or into rows of ``seq_len`` on ``path``: its total on a GPU (the allocator's peak counts
    the weights), what training adds on a CPU (the measured peak there is the rise above the loaded model)."""
    from tunesmith.machine.estimate import estimate, model_shape
    from tunesmith.models.random_weights import folder_for

    rows, width = (1, micro_tokens) if flat else (max(1, -(-micro_tokens // seq_len)), seq_len)
    train = recipe.train.model_copy(update={"batch_size": rows, "max_seq_length": width})
    e = estimate(model_shape(folder_for(recipe.model.name)), recipe.model_copy(update={"train": train}),
                 path.dtype, path.device, None, path.attention_kernel, path.loss)
    return (e.total if path.device == "cuda" else e.training_overhead) / 2**20


def _train(trainer, callbacks: list):
    for cb in callbacks:
        trainer.add_callback(cb)
    return trainer.train()


def trl_model(cfg: Config, args, cuda: bool):
    """The side's model as a plain TRL user builds it: bf16 where the device has it, the same seeded LoRA."""
    from tunesmith.config import LoraSection
    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.loading import load_model_for, wrap_adapter

    base = load_model_for(model_name(cfg, args), pick_placement("bf16" if cuda else "fp32"), cfg.adapter)
    if cfg.adapter == "qlora":  # what SFTTrainer does to a 4-bit model it is given with a peft_config
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    return base if cfg.adapter == "full" else wrap_adapter(
        base, cfg.adapter, LoraSection(r=16, alpha=32, dropout=0.0), args.seed)


def trl_settings(args, cuda: bool, accum: int = 1) -> dict:
    """What a TRL side's config shares: the steps, micro-steps, learning rate, schedule and logging of tunesmith's
    side (bf16 off on a CPU, where it is ~500x slower)."""
    return dict(seed=args.seed, max_steps=args.steps, gradient_accumulation_steps=accum, learning_rate=args.lr,
                lr_scheduler_type="constant",
                max_length=args.seq_len, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                **({} if cuda else {"bf16": False, "use_cpu": True}))


def measure_trl(trainer, args, cuda: bool, tokens=None) -> dict:
    """Train a TRL trainer (its own printing removed) under :func:`measure`, with its losses and steps."""
    from transformers import PrinterCallback, ProgressCallback

    for cb in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(cb)
    res = measure(functools.partial(_train, trainer), "cuda" if cuda else "cpu", args.steps, args.profile,
                  args.warmup, tokens)
    return res | losses_of(trainer.state.log_history) | {"steps": trainer.state.global_step}


def trl_tuned() -> dict:
    """TRL as a tuned user sets it: no gradient checkpointing, padding-free rows (transformers' SDPA keeps the
    examples apart by their position ids; the same examples a step as every side, not BFD-packed rows of
    ``max_length``, which padding-free TRL then leaves to the data: the rows here are already within it), Liger's
    kernels where installed on a GPU."""
    import torch

    liger = importlib.util.find_spec("liger_kernel") is not None and torch.cuda.is_available()
    return {"gradient_checkpointing": False, "padding_free": True, "max_length": None, "use_liger_kernel": liger}


def run_trl(cfg: Config, args, rows, out: Path, examples_per_step: int, model=None, tuned: bool = False) -> dict:
    """Plain TRL SFTTrainer defaults (bf16 only where the device has it), the same rows and examples per step;
    ``tuned``: :func:`trl_tuned`'s settings."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.loading import load_tokenizer

    cuda = pick_placement().device == "cuda"
    tokenizer = load_tokenizer(model_name(cfg, args))
    tokenizer.padding_side = "right"
    model = trl_model(cfg, args, cuda) if model is None else model
    batch, accum = split(examples_per_step, cfg, args)
    tuning = trl_tuned() if tuned else {}
    config = SFTConfig(output_dir=str(out / "trl"), per_device_train_batch_size=batch,
                       include_num_input_tokens_seen="non_padding", **(trl_settings(args, cuda, accum) | tuning))
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.data_collator = counted = Largest(trainer.data_collator)
    what = ("TRL tuned: " + ", ".join(f"{k} {v}" for k, v in tuning.items()) + f", SDPA, {'bf16' if cuda else 'fp32'}"
            if tuned else f"TRL defaults ({'bf16' if cuda else 'fp32'}, no packing, no kernels)")
    return measure_trl(trainer, args, cuda) | counted.per_step(accum) | {**param_counts(model), "path": what}


def run_reference(cfg: Config, args, rows, out: Path, examples_per_step: int) -> dict:
    """tunesmith's ``train.path: reference``: the product's plain TRL SFTTrainer on the path chosen here."""
    from tunesmith.machine.path import take_path
    from tunesmith.models.loading import load_model_for, load_tokenizer
    from tunesmith.models.random_weights import folder_for, save_weights
    from tunesmith.train.reference import reference_sft_trainer
    from tunesmith.train.sft import prepare_model

    if cfg.adapter == "qlora":
        save_weights(folder_for(model_name(cfg, args)))
    recipe, path, placement = take_path(recipe_for(cfg, args, out, examples_per_step, path="reference"))
    tokenizer = load_tokenizer(recipe.model.name)
    tokenizer.padding_side = "right"
    model = prepare_model(recipe, load_model_for(recipe.model.name, placement, cfg.adapter))
    trainer = reference_sft_trainer(recipe, model, tokenizer, rows, [], placement, out / "reference", save_strategy="no")
    return measure_trl(trainer, args, placement.device == "cuda") | {**param_counts(model),
                                                                      "path": path.describe() + _micro(recipe)}


def run_unsloth(cfg: Config, args, rows, out: Path, examples_per_step: int, offload: bool = True) -> dict:
    """Unsloth's ``FastLanguageModel`` with its defaults (its own gradient checkpointing; 4-bit for QLoRA,
    ``full_finetuning`` for full) and the same LoRA shape under the same TRL trainer settings. The side's process
    imported Unsloth first (:func:`run_side`), as Unsloth requires."""
    from unsloth import FastLanguageModel

    from tunesmith.models.random_weights import folder_for, save_weights

    folder = save_weights(folder_for(model_name(cfg, args)))
    model, _ = FastLanguageModel.from_pretrained(str(folder), max_seq_length=args.seq_len, dtype=None,
                                                 load_in_4bit=cfg.adapter == "qlora",
                                                 full_finetuning=cfg.adapter == "full", random_state=args.seed)
    if cfg.adapter != "full":
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0, random_state=args.seed,
                                                 # its default offloads checkpointed activations to the host
                                                 use_gradient_checkpointing="unsloth" if offload else True,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"])
    res = run_trl(cfg, args, rows, out / "unsloth", examples_per_step, model=model)
    import transformers
    import trl
    import unsloth

    how = "its offloaded checkpointing" if offload else "checkpointing not offloaded"
    return res | {"path": f"Unsloth {unsloth.__version__} FastLanguageModel ({how}) under TRL SFTTrainer defaults "
                          f"(transformers {transformers.__version__}, trl {trl.__version__})"}


def unsloth_usable(args) -> str | None:
    """Why the Unsloth side cannot run here (None when it can): it is neither installed nor in ``--unsloth-site``."""
    if args.unsloth_site:
        return None if (Path(args.unsloth_site) / "unsloth").is_dir() else f"no unsloth package in {args.unsloth_site}"
    return None if importlib.util.find_spec("unsloth") else "unsloth is not installed (scripts/gpu_kit.sh --unsloth)"


def run_head(cfg: Config, args, banking, out: Path, reference: bool = False) -> dict:
    """tunesmith's classifier head on BANKING77 messages (the model is written once so the head can load it); with
    ``reference``, on ``train.path: reference`` (transformers' Trainer on its own head model)."""
    from rich.console import Console

    from tunesmith.machine.path import take_path
    from tunesmith.models.loading import load_tokenizer
    from tunesmith.models.random_weights import folder_for, save_weights
    from tunesmith.records import Example
    from tunesmith.train.heads import TRAINING
    from tunesmith.train.reference import reference_head_trainer

    name = model_name(cfg, args)
    save_weights(folder_for(name), "float32" if args.tiny else "bfloat16")
    recipe = recipe_for(cfg, args, out, args.head_batch, path="reference" if reference else "fast")
    banking = banking[:args.head_batch * args.steps]  # every step new messages
    recipe, path, placement = take_path(recipe.model_copy(update={"data": recipe.data.model_copy(
        update={"target_field": "category", "prompt": "{text}"})}))
    labels = sorted({label for _, label in banking})
    examples = [Example(f"m{i}", {"text": t}, label) for i, (t, label) in enumerate(banking)]
    tokenizer = load_tokenizer(name)

    def train(callbacks):
        return TRAINING["classifier"].train(recipe, examples, labels, tokenizer, placement, no_bar, Console(quiet=True),
                                            False, callbacks, reference_head_trainer if reference else None)

    res = measure(train, placement.device, args.steps, args.profile, args.warmup)
    result = res["result"]
    losses = result_losses(result)
    return res | {"steps": args.steps, "last_loss": losses[-1] if losses else None, "late_loss": None,
                  "params": result.total_params, "path": path.describe() + " (classifier head; loss is over 77 labels)"}


def run_tunesmith_dpo(cfg: Config, args, pairs, out: Path, reference: bool = False) -> dict:
    """tunesmith's DPO (:class:`tunesmith.train.dpo_trainer.SyncFreeDPOTrainer`) on the path chosen here; with
    ``reference``, on ``train.path: reference`` (TRL's own DPOTrainer)."""
    from rich.console import Console

    from tunesmith.machine.path import take_path
    from tunesmith.models.loading import load_model_for, load_tokenizer
    from tunesmith.train.dpo import train_dpo
    from tunesmith.train.reference import reference_dpo_trainer

    out.mkdir(parents=True, exist_ok=True)
    path_file = out / "pairs.jsonl"
    path_file.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    recipe, path, placement = take_path(recipe_for(cfg, args, out, args.dpo_batch, path="reference" if reference
                                                   else "fast", dpo={"path": str(path_file), "beta": 0.1}))
    tokenizer = load_tokenizer(recipe.model.name)
    model = load_model_for(recipe.model.name, placement, cfg.adapter)

    def train(callbacks):
        return train_dpo(recipe, model, tokenizer, placement, Console(quiet=True), no_bar, callbacks=callbacks,
                         build=reference_dpo_trainer if reference else None)

    res = measure(train, placement.device, args.steps, args.profile, args.warmup)
    result = res["result"]
    return res | _loss_summary(result_losses(result)) | {"steps": args.steps, "params": result.total_params,
                                          "path": path.describe() + " (DPO, reference = adapter off)"}


def run_trl_dpo(cfg: Config, args, pairs, out: Path) -> dict:
    """Plain TRL ``DPOTrainer`` defaults (bf16 only where the device has it) with the same LoRA, pairs and batch."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.loading import load_tokenizer

    cuda = pick_placement().device == "cuda"
    model = trl_model(cfg, args, cuda)
    batch, accum = split(args.dpo_batch, cfg, args)
    config = DPOConfig(output_dir=str(out / "trl-dpo"), per_device_train_batch_size=batch, beta=0.1,
                       **trl_settings(args, cuda, accum))
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(pairs),
                         processing_class=load_tokenizer(model_name(cfg, args)))
    res = measure_trl(trainer, args, cuda, tokens=functools.partial(getattr, trainer, "_total_train_tokens"))
    return res | {**param_counts(model), "path": f"TRL DPOTrainer defaults ({'bf16' if cuda else 'fp32'})"}


@__import__("contextlib").contextmanager
def no_bar(desc, total):
    yield lambda n=1, info="": None


# --- the table ----------------------------------------------------------------------------------------
HEADER = ["| config | side | steps | tokens/s | MFU 6·N sheet (measured peak) | peak MB | estimated MB | last loss | late loss | "
          "host syncs / step | GPU busy | step s | path |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]


def row_text(cfg: str, side: str, r: dict, peak_flops: float, sheet_flops: float | None = None) -> str:
    """One table row; a GRPO side's late-loss cell holds its mean reward, its step cell the phases."""
    rate = r["tokens_per_s"]
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    busy = (r.get("profile") or {}).get("busy_fraction")
    step = fmt(r.get("step_s"), ".2f")
    if "phases" in r:
        ph = r["phases"]
        step += f" (rollout {ph['rollout_s']:.2f}, reward {ph['reward_s']:.2f}, update {fmt(ph['update_s'], '.2f')})"
    late = f"reward {fmt(r['reward'], '.3f')}" if "reward" in r else fmt(r["late_loss"], ".4f")
    percent = lambda v, f: "–" if v is None else format(100 * v, f) + "%"  # noqa: E731
    return (f"| {cfg} | {side} | {r['steps']} | {fmt(rate, ',.0f')} | {mfu_cell(cfg, r, peak_flops, sheet_flops)} | "
            f"{fmt(r['peak_mb'], ',.0f')} | {fmt(r.get('estimate_mb'), ',.0f')} | {fmt(r['last_loss'], '.4f')} | "
            f"{late} | {fmt(r['syncs_per_step'], '.1f')} | {percent(busy, '.0f')} | {step} | {r['path']} |")


def parse_args(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated: {', '.join(CONFIGS)}; or a group: " + ", ".join(
                        f"{k} ({v})" for k, v in GROUPS.items()))
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per side (default 10; --smoke 3)")
    ap.add_argument("--warmup", type=int, default=3, help="steps before the clock starts (at most steps - 1)")
    ap.add_argument("--tokens-per-step", type=int, default=None, help="real tokens per step (default 16,384)")
    ap.add_argument("--accum", type=int, default=None, help="micro-steps per step (default: per configuration)")
    ap.add_argument("--checkpointing", choices=["auto", "off", "on"], default=None,
                    help="tunesmith's train.gradient_checkpointing (default: per configuration; auto: the product's "
                         "memory estimate for batch x max_seq_length tokens)")
    ap.add_argument("--max-completion", type=int, default=None, help="GRPO: tokens per completion (default 128)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds the whole run may take: a side gets at most what is left, one that cannot start "
                         "in time is skipped with a note")
    ap.add_argument("--attention", default="auto",
                    help="tunesmith's side once per kernel, comma-separated: auto, sdpa, flex_attention, eager")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--rows-per-source", type=int, default=400)
    ap.add_argument("--head-batch", type=int, default=None, help="messages per step (1b-head; default: --tokens-per-step)")
    ap.add_argument("--dpo-batch", type=int, default=None, help="preference pairs per step (1b-dpo; default: "
                    "--tokens-per-step)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the embedded SmolLM2's)")
    ap.add_argument("--tiny", action="store_true", help="2 layers, hidden 64, rows of 256 tokens")
    ap.add_argument("--smoke", action="store_true", help="--tiny, 3 steps, few rows and tokens: a CPU smoke run")
    ap.add_argument("--no-trl", action="store_true", help="tunesmith's side only")
    ap.add_argument("--sides", default=None,
                    help="only these sides, comma-separated: ours, reference, trl, unsloth (default: every side)")
    ap.add_argument("--without", default="",
                    help="leave out these sides, by exact name, comma-separated (e.g. trl-tuned,unsloth-plain): a short "
                         "lease keeps the pairs that matter")
    ap.add_argument("--reference", action="store_true",
                    help="also tunesmith's train.path: reference (plain TRL / transformers trainers) as a side")
    ap.add_argument("--profile", action="store_true", help="top kernels and GPU busy fraction per side")
    ap.add_argument("--side-timeout", type=float, default=None, help="seconds a side may run before it is stopped")
    ap.add_argument("--unsloth-site", default=None,
                    help="folder with Unsloth and the versions it pins (scripts/gpu_kit.sh --unsloth), put ahead of the "
                         "others on the Unsloth side's path only")
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)  # CONFIG:SIDE:ATTENTION, run in a child process
    args = ap.parse_args(argv)
    args.configs = ",".join(GROUPS.get(c.strip(), c.strip()) for c in args.configs.split(","))
    if args.smoke:
        args.tiny = True
        args.steps = args.steps or 3
        args.rows_per_source = min(args.rows_per_source, 12)
        args.tokens_per_step = args.tokens_per_step or 512
        args.max_completion = args.max_completion or 8
        args.seq_len = min(args.seq_len, 128)
    if args.tiny:
        args.seq_len = min(args.seq_len, 256)
        args.rows_per_source = min(args.rows_per_source, 40)
    args.steps = args.steps or args.warmup + 10 + (1 if args.profile else 0)  # ≥ 10 timed, the profiled one apart
    args.tokens_per_step = args.tokens_per_step or 16384
    args.max_completion = args.max_completion or 128
    args.warmup = max(1, min(args.warmup, args.steps - 1))
    return args


def prepare(args) -> tuple[list[dict], list[tuple[str, str]], int, str]:
    """Quiet logging, the rows that fit ``--seq-len``, the BANKING77 pairs, examples per step (about
    ``--tokens-per-step`` real tokens; the head's and DPO's too) and the device; the same in the parent and in
    every side's process (seeded)."""
    import datasets
    import torch
    from transformers.utils import logging as hf_logging

    from tunesmith.data.formats.chat_rows import tokenize_rows
    from tunesmith.models.loading import load_tokenizer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    tok = load_tokenizer(args.tokenizer or "smollm2-135m-instruct")
    args.vocab = (len(tok) + 63) // 64 * 64
    rows, banking = load_rows(args.rows_per_source, args.seed)
    lengths = [len(ex["input_ids"]) for ex in tokenize_rows(rows, tok)]
    keep = [r for r, n in zip(rows, lengths, strict=True) if n <= args.seq_len]
    kept = [n for n in lengths if n <= args.seq_len]
    args.mean_tokens = sum(kept) / len(kept)
    per_step = max(1, round(args.tokens_per_step / args.mean_tokens))
    if args.head_batch is None and banking:
        texts = [len(tok(t)["input_ids"]) for t, _ in banking[:200]]
        args.head_batch = min(len(banking), max(1, round(args.tokens_per_step * len(texts) / sum(texts))))
    if args.dpo_batch is None and DPO_PAIRS.is_file():
        args.dpo_batch = max(1, round(args.tokens_per_step / pair_tokens(load_pairs(100), tok)))
    return keep, banking, per_step, "cuda" if torch.cuda.is_available() else "cpu"


def pair_tokens(pairs: list[dict], tok) -> float:
    """Mean tokens of a preference pair's two sequences (prompt + chosen, prompt + rejected), about as TRL counts."""
    from tunesmith.data.formats.chat_rows import row_tokens

    return sum(row_tokens({"prompt": p["prompt"], "completion": p[side]}, tok)
               for p in pairs for side in ("chosen", "rejected")) / len(pairs)


def sides_of(cfg: Config, args, device: str) -> list[tuple[str, str, str]]:
    """(label, side, attention) of each side of ``cfg`` that can run here and ``--sides`` keeps; notes for those
    that cannot."""
    drop = {s.strip() for s in args.without.split(",") if s.strip()}
    every = [s for s in _all_sides(cfg, args, device) if s[1] not in drop]
    if not args.sides:
        return every
    keep = {s.strip() for s in args.sides.split(",")}
    return [s for s in every if s[1].split("-")[0] in keep]


def _all_sides(cfg: Config, args, device: str) -> list[tuple[str, str, str]]:
    def reference(label: str, side: str) -> list[tuple[str, str, str]]:
        return [(label, side, "auto")] if args.reference else []

    if cfg.adapter == "qlora" and device != "cuda":
        print(f"note: {cfg.name} needs a CUDA GPU (bitsandbytes 4-bit); skipped")
        return []
    if cfg.method == "grpo":
        return [("tunesmith GRPO", "ours-grpo", "auto")] + ([] if args.no_trl else [("TRL GRPO", "trl-grpo", "auto")])
    if cfg.method == "dpo":
        if not DPO_PAIRS.is_file():
            print(f"note: {cfg.name} needs the DPO demo pairs under {SHARED}; skipped")
            return []
        return ([("tunesmith DPO", "ours-dpo", "auto")] + reference("tunesmith reference DPO", "reference-dpo")
                + ([] if args.no_trl else [("TRL DPO", "trl-dpo", "auto")]))
    if cfg.head == "classifier":
        if not BANKING.is_file():
            print(f"note: {cfg.name} needs BANKING77; skipped")
            return []
        return ([("tunesmith head", "ours-head", "auto")] + reference("tunesmith reference head", "reference-head")
                + ([] if args.no_trl else [("TRL SFT", "trl-head", "auto")]))
    ours = [("tunesmith" + ("" if a == "auto" else f" ({a})"), "ours", a) for a in args.attention.split(",")]
    if cfg.checkpointing == "off" and not args.checkpointing:  # the product's auto rule beside the tuned choice
        ours += [("tunesmith, checkpointing off", "ours-nockpt", "auto")]
    ours += reference("tunesmith reference", "reference")
    if args.no_trl:
        return ours
    why_not = unsloth_usable(args)
    if why_not:
        print(f"note: {cfg.name}: no Unsloth side ({why_not})")
    unsloth = [] if why_not else [("Unsloth", "unsloth", "auto"),
                                  ("Unsloth, checkpointing not offloaded", "unsloth-plain", "auto")]
    return ours + [("TRL", "trl", "auto"), ("TRL tuned", "trl-tuned", "auto")] + unsloth


def run_side(args) -> dict | None:
    """The side ``--side CONFIG:SIDE:ATTENTION`` names, in this (child) process."""
    cname, side, attention = args.side.split(":")
    cfg = CONFIGS[cname]
    if side.startswith("unsloth"):  # before anything imports transformers: Unsloth patches them when imported first; a
        import unsloth  # noqa: F401 - failing import fails this side's process like any other error (SideFailed)
    rows, banking, per_step, _ = prepare(args)
    with tempfile.TemporaryDirectory(prefix="gpu-train-") as tmp:
        out = Path(tmp) / cfg.name
        if side in ("ours", "ours-nockpt"):  # the product's checkpointing rule (auto), or off
            checkpointing = "off" if side == "ours-nockpt" else args.checkpointing or "auto"
            return run_tunesmith(cfg, args, rows, out / attention, per_step, attention, checkpointing)
        if side in ("trl", "trl-tuned"):
            return run_trl(cfg, args, rows, out, per_step, tuned=side == "trl-tuned")
        if side in ("unsloth", "unsloth-plain"):
            return run_unsloth(cfg, args, rows, out, per_step, offload=side == "unsloth")
        if side == "reference":
            return run_reference(cfg, args, rows, out, per_step)
        if side in ("ours-head", "reference-head"):
            return run_head(cfg, args, banking, out, reference=side == "reference-head")
        if side == "trl-head":
            head_rows = [_row([("system", SYSTEM_BANKING), ("user", t)], label)
                         for t, label in banking[:args.head_batch * args.steps]]
            return run_trl(cfg, args, head_rows, out, args.head_batch)
        if side in ("ours-grpo", "trl-grpo"):
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            import gpu_grpo

            bench = sys.modules["__main__"]
            if side == "ours-grpo":
                return gpu_grpo.run_tunesmith_grpo(bench, cfg, args, rows, out / side)
            return gpu_grpo.run_trl_grpo(bench, cfg, args, rows, out)
        pairs = load_pairs(args.rows_per_source)
        if side in ("ours-dpo", "reference-dpo"):
            return run_tunesmith_dpo(cfg, args, pairs, out / side, reference=side == "reference-dpo")
        return run_trl_dpo(cfg, args, pairs, out)


RESULT = "side result: "


class SideFailed(Exception):
    """A side's process ended with an error or ran past ``--side-timeout``: its row is missing, the others run."""


def side_env(args, side: str, device: str) -> dict:
    """The environment of a side's process: Unsloth's side gets ``--unsloth-site`` ahead of the rest of the path
    (its pinned transformers, trl and datasets shadow the kit's), its compile cache in the temporary folder and,
    on a CPU, Unsloth's own CPU backend."""
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    if side.startswith("unsloth"):
        if args.unsloth_site:
            env["PYTHONPATH"] = os.pathsep.join(p for p in [args.unsloth_site, env.get("PYTHONPATH")] if p)
        env.setdefault("UNSLOTH_COMPILE_LOCATION", str(Path(tempfile.gettempdir()) / "unsloth_compiled_cache"))
        if device != "cuda":
            env["UNSLOTH_FORCE_CPU"] = "1"
    return env


def in_child(args, cname: str, side: str, attention: str, device: str, timeout: float | None = None) -> dict | None:
    """Run one side in a fresh Python process: its own CUDA context and allocator peak, and its own module state
    (Liger patches transformers' rotary embedding module-wide, Unsloth much more; in one process a later side
    would run with them). Its printed notes pass through; its result comes back as one JSON line (None: the side
    skipped itself with a note); :class:`SideFailed` when the process failed or ran out of time."""
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--side", f"{cname}:{side}:{attention}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=side_env(args, side, device),
                              timeout=timeout if timeout is not None else args.side_timeout)
    except subprocess.TimeoutExpired as exc:  # one stuck side must not take the others' time
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        print(out[-2000:])
        raise SideFailed(f"stopped after {exc.timeout:.0f} s (--side-timeout / --deadline)") from None
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            result = json.loads(line[len(RESULT):])
        else:
            print(line)
    if proc.returncode != 0:
        print(proc.stderr[-4000:])
        raise SideFailed(f"the side's process failed (exit {proc.returncode})")
    return result


def run_sides(args, device: str, peak: float, sheet: float | None = None) -> tuple[list[str], list[str]]:
    """Every side of every configuration asked, each in its own process for at most ``--side-timeout`` seconds and
    what is left of ``--deadline``; returns the table's lines and the sides without a row (and why)."""
    lines = list(HEADER)
    failed: list[str] = []
    started = time.monotonic()
    for cname in args.configs.split(","):
        cfg = CONFIGS[cname.strip()]
        firsts: list[tuple[str, float]] = []
        for label, side, attention in sides_of(cfg, args, device):
            left = None if args.deadline is None else args.deadline - (time.monotonic() - started)
            if left is not None and left < 30:
                failed.append(f"{cfg.name} {label}: not started, {max(left, 0):.0f} s left of --deadline")
                print(f"note: {failed[-1]}", flush=True)
                continue
            print(f"{cfg.name}: {label} ...", flush=True)
            timeout = min(t for t in (args.side_timeout, left) if t is not None) if (args.side_timeout or left) else None
            try:
                r = in_child(args, cfg.name, side, attention, device, timeout)
            except SideFailed as exc:
                failed.append(f"{cfg.name} {label}: {exc}")
                print(f"note: {failed[-1]}; no row", flush=True)
                continue
            if r is None:
                continue
            lines.append(row_text(cfg.name, label, r, peak, sheet))
            print(lines[-1], flush=True)
            if r.get("real_tokens_per_step"):
                print(f"  tokens per step: {r['real_tokens_per_step']:,.0f} real, {r['padded_tokens_per_step']:,.0f} "
                      f"computed on (rows x width); {r.get('timed_steps')} steps timed")
            if r.get("first_losses"):
                firsts.append((label, r["first_losses"]))
            if r.get("largest_micro_tokens"):
                print(f"  largest micro-batch {r['largest_micro_tokens']:,} real tokens (the estimate's size)")
            print(f"  host syncs per training step: {r['syncs_per_step']:.1f}"
                  + (f" (top: {'; '.join(r['sync_sites'])})" if r["sync_sites"] else ""))
            if r.get("profile"):
                print("  top kernels: " + "; ".join(r["profile"]["top"]))
                if r["profile"]["busy_fraction"] is not None:
                    print(f"  GPU busy {100 * r['profile']['busy_fraction']:.0f}% of the last step (first kernel to last)")
        failed += loss_check(cfg, firsts, device)
    return lines, failed


# the first steps' losses: the same weights and examples on every side, so only how a side computes the loss and
# its gradient can differ (bf16 rounding on a GPU; fp32 on a CPU). With random weights the first step's loss is
# near log(vocabulary) whatever a side computes; the steps after it differ when a side's gradients do (a loss
# normalised otherwise, examples that see each other)
FIRST_LOSS_TOLERANCE = {"cuda": 1e-2, "cpu": 2e-3}


def loss_check(cfg: Config, firsts: list[tuple[str, list[float]]], device: str) -> list[str]:
    """Every side's losses at the first :data:`CHECKED_STEPS` steps against the first side's (tunesmith's), each
    within :data:`FIRST_LOSS_TOLERANCE` (relative); the sides that are not, as failures. GRPO samples its own
    completions: not compared."""
    if cfg.method == "grpo" or len(firsts) < 2:
        return []
    tol, (ref_label, ref) = FIRST_LOSS_TOLERANCE[device], firsts[0]
    out = []
    for label, losses in firsts[1:]:
        pairs = list(zip(losses, ref, strict=False))
        worst = max(range(len(pairs)), key=lambda i: abs(pairs[i][0] - pairs[i][1]) / abs(pairs[i][1]))
        ok = all(abs(a - b) <= tol * abs(b) for a, b in pairs)
        print(f"  loss check {cfg.name}: {label} steps 1-{len(pairs)} "
              f"{' '.join(f'{a:.4f}' for a, _ in pairs)} vs {ref_label} {' '.join(f'{b:.4f}' for _, b in pairs)} "
              f"({'within' if ok else 'OUTSIDE'} {tol:g} relative)")
        if not ok:
            a, b = pairs[worst]
            out.append(f"{cfg.name} {label}: step {worst + 1} loss {a:.4f} vs {ref_label}'s {b:.4f}, over {tol:g}")
    return out


def main() -> None:
    args = parse_args()
    if args.side:
        r = run_side(args)
        if r is not None:
            r.pop("result", None)
            print(RESULT + json.dumps(r))
        return
    import torch
    import transformers
    import trl

    rows, _, per_step, device = prepare(args)
    peak, dtype = matmul_peak(device)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    sheet = sheet_peak(name) if device == "cuda" else None
    print(f"device: {name}; measured dense {dtype} matmul peak {peak / 1e12:,.3f} TFLOP/s; the sheet's bf16 dense "
          + (f"peak {sheet / 1e12:,.0f} TFLOP/s" if sheet else "peak: none known here"))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
          + (" · TINY models (2 layers, hidden 64): a smoke run, not a measurement of the architectures" if args.tiny else ""))
    print(f"{len(rows)} rows of ≤ {args.seq_len} tokens (mean {args.mean_tokens:.0f}); {per_step} examples per step "
          f"(≈ {args.tokens_per_step:,} tokens; head {args.head_batch} messages, DPO {args.dpo_batch} pairs); "
          "each side in its own process")
    print("MFU = 6·N·tokens/s over the sheet's peak (over the measured one in brackets), N = parameters without the "
          "input embedding (4-bit weights at their unquantised count), attention FLOPs not counted (NeMo's and "
          "the published figures' convention); LoRA sides add 4·N (frozen weights take no weight gradient)")
    lines, failed = run_sides(args, device, peak, sheet)
    print("\n" + "\n".join(lines))
    if failed:
        raise SystemExit("sides without a row: " + "; ".join(failed))


if __name__ == "__main__":
    main()
