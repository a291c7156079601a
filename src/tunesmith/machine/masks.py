"""Attention masks in the form each attention kernel takes: which kind a model needs, and the block-causal
(packed rows) and padded-causal masks a decoder gets built on the device. One converter, :func:`as_kind`,
serves training (packing, padded batches) and label scoring."""

from __future__ import annotations


def decoder_only(config) -> bool:
    """Whether ``config`` is a decoder-only (causal) language model: transformers has a causal-LM class for its
    model type and no masked-LM class (BERT-like encoders have both)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    kind = getattr(config, "model_type", None)
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def mask_kind(model) -> str:
    """The 4D mask form ``model``'s attention kernel needs: ``"bool"`` (sdpa), ``"float"`` (eager) or
    ``"none"`` (flash attention, which takes no 4D mask, and flex attention, which builds its own block mask
    from the position ids or the 2D padding mask; the collator builds none)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") or "sdpa"
    if "flash" in impl or impl == "flex_attention":
        return "none"
    return "bool" if impl == "sdpa" else "float"



def padded_mask_kind(model) -> str:
    """How a right-padded batch for ``model`` reaches it: with the tokenizer's padding mask (``"2d"``), or with
    the 4D mask of a decoder that the trainer builds from it on the device (``"bool"`` for sdpa, ``"float"`` for
    eager; see :func:`padded_causal_mask`). Given a 2D mask, transformers checks on the host whether it may skip
    it, which on a GPU waits for the device on every forward pass. Encoders, flash attention (it takes only a 2D mask),
    flex attention (it builds its own block mask) and models with sliding-window layers (a 4D mask would stand
    for those layers' own) keep the 2D mask."""
    from tunesmith.machine.masks import decoder_only

    config = model.config
    if not decoder_only(config) or "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return "2d"
    kind = mask_kind(model)
    return "2d" if kind == "none" else kind



def block_causal_mask(segment, kind: str = "bool", dtype=None):
    """(rows, 1, L, L) mask: query i sees key j iff j <= i and both belong to the same example.

    Padding (segment -1) sees only itself, so no softmax row is empty (which would give NaN).
    """
    import torch

    width = segment.shape[1]
    same = segment[:, :, None] == segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (same & causal) | torch.eye(width, dtype=torch.bool)
    return as_kind(allowed[:, None], kind, dtype)



def padded_causal_mask(attention_mask, kind: str = "bool", dtype=None):
    """(rows, 1, L, L) mask of a right-padded batch, the one a decoder builds from its 2D ``attention_mask``:
    query i sees key j iff j <= i and j is a real token (a padding query sees the real tokens before it).
    Built on the mask's own device from its values without reading them, so the model neither builds it
    nor checks the 2D mask's values on the host (a wait for the GPU)."""
    import torch

    width = attention_mask.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=attention_mask.device).tril()
    return as_kind((causal[None] & attention_mask.bool()[:, None, :])[:, None], kind, dtype)



def as_kind(allowed, kind: str, dtype=None):
    """A boolean (rows, 1, L, L) mask (True = attend) as ``kind`` needs it: itself (sdpa), or additive 0 / dtype min
    for eager attention (``"float"``)."""
    import torch

    if kind != "float":
        return allowed
    dtype = dtype or torch.float32
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
