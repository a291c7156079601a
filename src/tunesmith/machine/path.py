"""The training path a recipe takes on this machine: its wishes read, the device probed, gradient checkpointing
decided by the memory estimate, and the process held to the recipe's memory limit. The rules themselves are in
:mod:`tunesmith.machine.device` (pure) and :mod:`tunesmith.machine.estimate`."""

from __future__ import annotations

from tunesmith.machine.device import Capabilities, TrainPath, Wishes, choose_path, probe
from tunesmith.machine.estimate import estimate_recipe


def wishes(recipe, softcapping: bool = False, rows: list[dict] | None = None) -> Wishes:
    """The recipe's wishes (``rows``: a fine-tuning job's rows, as uploaded)."""
    t = recipe.train
    return Wishes(precision=recipe.model.precision, device=recipe.model.device, adapter=t.adapter, head=t.head,
                  method=t.method, packing=t.packing, optimizer=t.optimizer, attention=t.attention, kernels=t.kernels,
                  loss=t.loss, path=t.path, fast_only=fast_only(recipe, rows),
                  gradient_checkpointing=t.gradient_checkpointing, softcapping=softcapping)


def fast_only(recipe, rows: list[dict] | None = None) -> str | None:
    """Why only tunesmith's fast path can train this recipe and data (None when the reference path can too)."""
    t = recipe.train
    if rows and any("messages" in r for r in rows):
        return "only it trains conversation rows (a loss on each weight-1 assistant turn)"
    if t.pooling == "mean" or t.head_init == "probe":
        return "only it has mean pooling and the linear-probe start of a head"
    return None



def model_softcaps(model) -> bool:
    """Whether the recipe's model (its ``model`` section) soft-caps attention logits (Gemma-2), read from config.json
    only."""
    import json
    from pathlib import Path

    try:
        cfg = json.loads((Path(model.folder) / "config.json").read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - a hub id, an unreadable config, a tokenizer not pulled yet: assume not
        return False
    return bool(cfg.get("text_config", cfg).get("attn_logit_softcapping"))



def decide(recipe, caps: Capabilities | None = None, rows: list[dict] | None = None) -> TrainPath:
    """The path for ``recipe`` on this machine: capabilities probed, gradient checkpointing from the estimator."""
    caps = caps or probe(recipe.model.device)
    wish = wishes(recipe, model_softcaps(recipe.model), rows)
    fits = None
    if wish.gradient_checkpointing == "auto" and caps.cuda:
        first = choose_path(caps, wish)  # attention and loss are chosen without the memory verdict
        fits = _fits_without_checkpointing(recipe, first, caps)
    return choose_path(caps, wish, fits)



def _fits_without_checkpointing(recipe, first: TrainPath, caps: Capabilities) -> bool | None:
    """The estimator's verdict for the batch without gradient checkpointing on ``first``'s device, dtype, attention
    and loss, against the device's free memory or ``train.memory_limit_gb`` (None when it cannot estimate)."""
    try:
        plain = recipe.model_copy(update={"train": recipe.train.model_copy(update={"gradient_checkpointing": False})})
        return estimate_recipe(plain, first, caps.free_memory).fits
    except Exception:  # noqa: BLE001 - an estimate we cannot make never blocks training
        return None



def hold_memory_limit(recipe, path: TrainPath) -> float | None:
    """Hold this process to ``train.memory_limit_gb`` of the CUDA GPU (PyTorch's per-process memory fraction:
    an allocation beyond it fails as out of memory, as on a GPU of that size); returns the fraction set."""
    limit = recipe.train.memory_limit_gb
    if limit is None or path.device != "cuda":
        return None
    import torch

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    fraction = min(1.0, limit * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction)
    return fraction



def take_path(recipe, rows: list[dict] | None = None):
    """Decide the path for ``recipe`` (and a job's ``rows``) here and take it: the recipe with the path written in,
    the path, and the placement models load with; the process held to ``train.memory_limit_gb``."""
    from tunesmith.machine.placement import Placement

    path = decide(recipe, rows=rows)  # precision, attention, packing, kernels, optimizer, checkpointing for this machine
    recipe, note = fit_micro_batch(resolved(recipe, path), path)
    if note:
        path.reasons["micro_batch"] = note
    hold_memory_limit(recipe, path)
    return recipe, path, Placement(path.device, path.dtype, path)


def fit_micro_batch(recipe, path: TrainPath):
    """Halve the micro-batch (doubling gradient accumulation, so an optimizer step sees the same examples) until the
    memory estimate on ``path`` fits the device's free memory or ``train.memory_limit_gb``; returns the recipe and
    a note saying what changed, or that even a micro-batch of 1 does not fit (None when nothing changed). A
    micro-batch that fits only by the estimate's word runs: an estimate that cannot be made never blocks training."""
    try:
        est = estimate_recipe(recipe, path)
    except Exception:  # noqa: BLE001 - the model's files not readable here: train as asked
        return recipe, None
    t = recipe.train
    batch, accum = t.batch_size, t.grad_accum
    while est.fits is False and batch > 1:
        batch, accum = batch // 2, accum * 2
        recipe = recipe.with_train(batch_size=batch, grad_accum=accum)
        est = estimate_recipe(recipe, path)
    notes = []
    if batch != t.batch_size:
        notes.append(f"train.batch_size {t.batch_size} would need more memory than planned for; micro-batches of "
                      f"{batch} x {accum} accumulation steps (same effective batch)")
    if est.fits is False:
        notes.append(f"even micro-batches of 1 are estimated at {est.total / 2**20:,.0f} MB of "
                     f"{est.available / 2**20:,.0f} MB; lower train.max_seq_length or set "
                     "train.gradient_checkpointing: true")
    return recipe, "; ".join(notes) or None



def resolved(recipe, path: TrainPath):
    """The recipe with the path's name, optimizer and gradient checkpointing written in (what actually runs)."""
    t = recipe.train.model_copy(update={"optimizer": path.optimizer, "path": path.name,
                                        "gradient_checkpointing": path.gradient_checkpointing})
    return recipe.model_copy(update={"train": t})
