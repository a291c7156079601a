"""Packed rows on variable-length attention, their boundaries handed over by the collator.

transformers finds the examples packed in a row from their restarting position ids, and decides whether a row is
packed at all with a ``.all()`` on the device's values (``masking_utils.find_packed_sequence_indices``): on a GPU a
wait in every forward pass. Here the collator (:class:`tunesmith.machine.packing.PackedCollator`, ``mask_kind
"varlen"``) computes on the host where each example starts and ends in the flattened ``(rows x width)`` batch
(``cu_seq_lens_q``: int32, ``N + 1`` offsets, a row's padding tail counted as one more segment, so segments never
cross rows) and the longest segment (``max_length_q``, a Python int), under the names of transformers'
``FlashAttentionKwargs``, which every decoder passes through to its attention function. :func:`attention` is that
function, registered with transformers' ``AttentionInterface`` as :data:`NAME`; it has no mask function, so
transformers builds no mask and checks nothing for it (``_preprocess_mask_arguments`` returns early). The trainer
switches a model to it for the length of its training only (:func:`varlen_attention`), so that generation and
evaluation outside training keep the model's own attention.

Kernels, the first that can run a call (the path names the one it expects, :mod:`tunesmith.machine.device`):

- ``torch``: PyTorch's own ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention's variable-length kernel
  inside torch, ≥ 2.10; CUDA, bf16/fp16, no dropout). Its signature changed between releases (2.10 ``is_causal``;
  2.11 ``scale`` and ``window_size``; 2.12 ``enable_gqa``): read once, and what a release lacks is made up (key and
  value heads repeated for grouped-query attention) or passed on to the next kernel (a scale other than the
  default where it takes none);
- ``flash_attn``: FlashAttention's ``flash_attn_varlen_func`` where the package is installed (CUDA, bf16/fp16);
- ``sdpa``: PyTorch's SDPA with the block-diagonal causal mask built on the device from the offsets (a
  ``searchsorted``, sized by the shapes only: no read), once per forward pass for all layers.

Sliding windows (Mistral, Gemma-2's local layers) are honoured by all three; soft-capped attention logits only by
FlashAttention (the path never packs a soft-capping model this way).
"""

from __future__ import annotations

import functools
import inspect
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

from tunesmith.errors import TrainingError

NAME = "tunesmith_varlen"
KERNELS = ("torch", "flash_attn", "sdpa")  # in order of preference
HALF = ("float16", "bfloat16")


@dataclass
class _State:
    want: str = "torch"  # the first kernel to try (the path's choice)
    used: Counter = field(default_factory=Counter)  # kernel -> attention calls it ran
    mask: tuple | None = None  # (offsets tensor, rows, width, window, mask): one forward pass's SDPA mask


STATE = _State()


def boundaries(rows: list[list[int]], width: int) -> tuple[list[int], int]:
    """Offsets of every segment in the flattened ``(len(rows) x width)`` batch and the longest segment, from the
    lengths of the examples in each row (a row's padding after them is a segment of its own)."""
    offsets, longest = [0], 1
    for r, lengths in enumerate(rows):
        for n in lengths:
            offsets.append(offsets[-1] + n)
            longest = max(longest, n)
        end = (r + 1) * width
        if offsets[-1] < end:
            longest = max(longest, end - offsets[-1])
            offsets.append(end)
    return offsets, longest


@functools.cache
def torch_varlen():
    """``(varlen_attn, its parameter names)`` where this torch has it, else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


@functools.cache
def flash_varlen():
    """FlashAttention's ``flash_attn_varlen_func`` where the package is installed, else None."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def register() -> str:
    """Register :func:`attention` with transformers as :data:`NAME` (once); returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention)
    return NAME


@contextmanager
def varlen_attention(model, kernel: str = "torch"):
    """Run ``model`` (a causal LM, or a PEFT model around one) on :func:`attention` inside the block, trying
    ``kernel`` first; its own attention implementation is back afterwards."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown variable-length kernel {kernel!r}; one of {', '.join(KERNELS)}")
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    before, previous = lm.config._attn_implementation, STATE.want
    lm.set_attn_implementation(register())
    STATE.want = kernel
    try:
        yield
    finally:
        lm.set_attn_implementation(before)
        STATE.want, STATE.mask = previous, None


def attention(module, query, key, value, attention_mask=None, scaling=None, dropout: float = 0.0,
              sliding_window=None, softcap=None, cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None,
              max_length_k=None, **kwargs):
    """transformers' attention-function interface: ``query`` (B, Hq, L, D), ``key``/``value`` (B, Hkv, L, D) of
    packed rows whose segments ``cu_seq_lens_q`` bounds; returns ((B, L, Hq, D), None)."""
    if cu_seq_lens_q is None or max_length_q is None:
        raise TrainingError("tunesmith's variable-length attention got a batch without the collator's sequence "
                            "boundaries (cu_seq_lens_q, max_length_q): only batches of tunesmith's packing collator "
                            "(mask_kind 'varlen') can run on it")
    if not getattr(module, "is_causal", True):
        raise TrainingError("tunesmith's variable-length attention packs causal decoders only")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    for kernel in KERNELS[KERNELS.index(STATE.want):]:
        out = RUNS[kernel](module, query, key, value, scaling, dropout, sliding_window, softcap, cu_seq_lens_q,
                           max_length_q)
        if out is not None:
            STATE.used[kernel] += 1
            return out, None
    raise TrainingError("the model soft-caps attention logits, which only FlashAttention's variable-length kernel "
                        "applies (flash-attn is not installed here); train.attention: flex_attention packs it by "
                        "position ids instead")


def _flat(t):
    """(B, H, L, D) -> (B*L, H, D), the layout of the variable-length kernels."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b * n, h, d)


def _half_on_cuda(query) -> bool:
    """The flash kernels' inputs: CUDA tensors in bf16 or fp16."""
    return query.is_cuda and str(query.dtype).removeprefix("torch.") in HALF


def _run_torch(module, query, key, value, scaling, dropout, window, softcap, cu, longest):
    found = torch_varlen()
    if found is None or dropout or softcap or not _half_on_cuda(query):
        return None
    run, params = found
    kw = {}
    if "window_size" in params:
        kw["window_size"] = (window - 1 if window else -1, 0)  # (left, right): right 0 is causal
    elif "is_causal" in params and not window:
        kw["is_causal"] = True
    else:
        return None
    if "scale" in params:
        kw["scale"] = scaling
    elif abs(scaling - query.shape[-1] ** -0.5) > 1e-12:
        return None
    q, k, v = _flat(query), _flat(key), _flat(value)
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    cu = cu.to(device=q.device, dtype=_int32())
    out = run(q, k, v, cu, cu, longest, longest, **kw)
    return out.view(query.shape[0], query.shape[2], *out.shape[1:])


def _run_flash(module, query, key, value, scaling, dropout, window, softcap, cu, longest):
    run = flash_varlen()
    if run is None or not _half_on_cuda(query):
        return None
    cu = cu.to(device=query.device, dtype=_int32())
    out = run(_flat(query), _flat(key), _flat(value), cu, cu, longest, longest, dropout_p=dropout,
              softmax_scale=scaling, causal=True, window_size=(window - 1 if window else -1, 0),
              softcap=softcap or 0.0)
    return out.view(query.shape[0], query.shape[2], *out.shape[1:])


def _run_sdpa(module, query, key, value, scaling, dropout, window, softcap, cu, longest):
    if softcap:
        return None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    mask = block_mask(cu, query.shape[0], query.shape[2], window, query.device)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                  is_causal=False)[0]


RUNS = {"torch": _run_torch, "flash_attn": _run_flash, "sdpa": _run_sdpa}


def _int32():
    import torch

    return torch.int32


def block_mask(cu, rows: int, width: int, window: int | None = None, device=None):
    """(rows, 1, width, width) bool mask from the segment offsets ``cu``: query i sees key j iff j <= i, both lie
    in the same segment (and i - j < ``window``). Built on ``device`` from the offsets' values without reading
    them; kept for the layers after the first of the same forward pass (the same offsets tensor)."""
    import torch

    cached = STATE.mask
    if cached is not None and cached[0] is cu and cached[1:4] == (rows, width, window):
        return cached[4]
    cu_dev = cu.to(device=device, dtype=torch.int64)
    position = torch.arange(rows * width, device=device)
    segment = torch.searchsorted(cu_dev[1:], position, right=True).view(rows, width)
    local = torch.arange(width, device=device)
    allowed = (segment[:, :, None] == segment[:, None, :]) & (local[None, :, None] >= local[None, None, :])
    if window:
        allowed &= (local[:, None] - local[None, :] < window)[None]
    mask = allowed[:, None]
    STATE.mask = (cu, rows, width, window, mask)
    return mask
