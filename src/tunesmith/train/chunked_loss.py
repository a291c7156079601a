"""Score a causal LM only at its target positions, chosen by integer index, in vocabulary tiles.

The collator knows on the host which positions carry a loss; it hands them to the model as flat integer
indices (``target_index``) with their next tokens (``target_labels``). The patched forward runs the
backbone, gathers those positions with ``index_select`` (a boolean mask would size its result from the
device's values: a wait for the GPU on every forward pass) and projects them through the LM head with
TRL's chunked log-probability kernel (``trl.kernels.ChunkedLogProbFunction``: Triton on a GPU), which
never holds the ``(targets, vocabulary)`` logits: their memory (at a 128k vocabulary, ~1.5 MB per target
token in fp32 with its gradient) is what an 8B model's QLoRA batch cannot spare. The model's own output
transform (Gemma-2's final soft-cap, a logit scale) is applied inside the kernel.

On a CPU the kernel folds each tile with torch operations, whose temporaries are tiles too: there the tiles
are 2,048 wide, which keeps them small and, being cache-sized, makes the loss as fast as the logits loss
(SmolLM2-135M, 4 rows of 384 tokens: 4.38 s vs 4.31-4.58 s a step; 32,768-wide tiles took 5.48 s). The
logits loss (``train.loss: logits``, :func:`~tunesmith.train.trainer.completion_loss`) stays as the reference.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

from tunesmith.machine.device import tile_width


@dataclass
class TargetOutput:
    """Per target, in target order: the next token's log-probability, whether it is the model's top-1, and (asked
    for by DPO's metrics) the entropy and the mean logit of the next-token distribution."""

    log_probs: object
    is_top1: object
    entropy: object = None
    mean_logits: object = None


def output_transform(config) -> tuple[float | None, float]:
    """``(final soft-cap, logit scale)`` that the model applies to its LM head's output, read from its config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None)
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(text, name, None)
        if scale is not None:
            return softcap, float(scale)
    scaling = getattr(text, "logits_scaling", None)  # Granite and MiniCPM3 divide by it, HyperCLOVA X multiplies
    if scaling is not None:
        return softcap, float(scaling if getattr(text, "model_type", "") == "hyperclovax" else 1 / scaling)
    return softcap, 1.0


def causal_lm(model):
    """The causal LM inside a PEFT wrapper (PEFT injects its adapters into it, so its forward trains them)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def add_target_head(model) -> None:
    """Let ``model(..., target_index=i, target_labels=y)`` return a :class:`TargetOutput` for the flat positions
    ``i`` of its ``(rows, L)`` input. With ``target_layout`` too (TRL's DPO, which calls ``fused_lm_head=True``)
    it returns TRL's ``FusedCausalLMOutput`` instead, each per-token field scattered to the flat positions
    ``target_layout`` of TRL's ``(rows, L - 1)`` layout and zero elsewhere, so TRL's own reference pass uses
    it unchanged. Without ``target_index`` the forward is the one the model had (generation, evaluation, TRL's
    fused head). Patched on the causal LM's instance, so a PEFT, DDP or FSDP wrapper's forward still runs first."""
    lm = causal_lm(model)
    if getattr(lm, "_tunesmith_target_head", False):
        return
    original = lm.forward
    softcap, scale = output_transform(lm.config)

    def forward(self, *args, target_index=None, target_labels=None, target_layout=None, **kwargs):
        if target_index is None:
            return original(*args, **kwargs)
        for key in ("fused_lm_head", "labels", "shift_labels", "num_items_in_batch"):  # TRL's fused-head call
            kwargs.pop(key, None)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state  # the backbone: PreTrainedModel.base_model
        outputs = ("is_top1",) if target_layout is None else ("entropy", "mean_logits", "is_top1")
        out = score_targets(hidden, self.get_output_embeddings(), target_index, target_labels, softcap, scale,
                            outputs)
        return out if target_layout is None else in_layout(out, target_layout, hidden.shape[:2])

    lm.forward = types.MethodType(forward, lm)
    lm._tunesmith_target_head = True


def in_layout(out: TargetOutput, layout, shape):
    """``out`` as TRL's fused head returns it: ``(rows, L - 1)`` per-token fields, zero where no target is."""
    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    rows, width = shape
    layout = layout.to(out.log_probs.device)

    def spread(values):
        flat = values.new_zeros(rows * (width - 1))
        return flat.index_put((layout,), values).view(rows, width - 1)

    mask = spread(torch.ones_like(out.is_top1))
    return FusedCausalLMOutput(loss=None, log_probs=spread(out.log_probs), entropy=spread(out.entropy),
                               mean_logits=spread(out.mean_logits), is_top1=spread(out.is_top1), label_mask=mask)


def score_targets(hidden, head, target_index, target_labels, softcap=None, scale: float = 1.0,
                  outputs: tuple[str, ...] = ("is_top1",)) -> TargetOutput:
    """Log-probabilities of ``target_labels`` at the flat positions ``target_index`` of ``hidden`` (rows, L, H),
    with the per-target ``outputs`` of TRL's kernel (``is_top1``, ``entropy``, ``mean_logits``)."""
    from trl.kernels import ChunkedLogProbFunction

    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, target_index.to(hidden.device))
    weight, bias = head.weight, head.bias
    if hasattr(weight, "full_tensor"):  # FSDP2 shards the head as a DTensor: the kernel needs all of it
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    picked = picked.to(weight.device)
    log_probs, entropy, _, mean_logits, is_top1 = ChunkedLogProbFunction.apply(
        picked, weight, bias, target_labels.to(weight.device), 1.0, tile_width(weight.device), softcap, scale,
        outputs)
    return TargetOutput(log_probs, is_top1, entropy, mean_logits)
