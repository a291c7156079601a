"""Packed rows on tunesmith's variable-length attention (tunesmith.machine.varlen): the collator's boundaries reach
the registered attention function, the examples stay apart (loss and every gradient equal to one example at a time),
transformers' packed-position-ids check never runs, and a step reads nothing from the device. On a CPU the SDPA
kernel with the block mask built from the boundaries runs, and the variable-length kernels' calling convention is
checked against a reference at the seam; on a CUDA GPU (``scripts/gpu_run.sh verify``) PyTorch's own
``varlen_attn`` (and FlashAttention's where installed) must run and give the same loss and gradients."""

import importlib.util

import pytest
import torch

from tunesmith.data.formats.chat_rows import tokenize_example
from tunesmith.machine import varlen
from tunesmith.machine.packing import PackedCollator
from tunesmith.machine.syncs import StepReads
from tunesmith.train.trainer import completion_loss

from .conftest import banking_rows
from .test_train_sft import LABELS, _conv

CUDA = torch.cuda.is_available()


def _features(tiny_model_dir, n_short: int = 4):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = sorted(banking_rows(LABELS, 20), key=lambda r: len(r["text"]))
    return tok, [tokenize_example(*_conv(r["text"], r["category"]), tok) for r in rows[:n_short] + rows[-2:]]


def _model(tiny_model_dir, device="cpu", dtype=torch.float32, window=None, kv_heads=None):
    """The tiny Llama; with ``window`` (or ``kv_heads``) the same shape as a Mistral with that sliding window (and
    that many key/value heads), seeded random weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, MistralForCausalLM

    from tunesmith.train.chunked_loss import add_target_head

    if window or kv_heads:
        doc = LlamaConfig.from_pretrained(tiny_model_dir).to_dict()
        doc |= {"sliding_window": window, "num_key_value_heads": kv_heads or doc["num_key_value_heads"]}
        torch.manual_seed(0)
        model = MistralForCausalLM(MistralConfig(**doc)).to(device=device, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).to(device)
    add_target_head(model)
    return model


def _loss(model, batch: dict, device="cpu"):
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    loss, _, n = completion_loss(model, batch, num_items_in_batch=1, form="chunked")
    return loss, n


def _packed_vs_alone(model, tok, feats, kernel: str, capacity=None, device="cpu"):
    """(packed summed loss, its gradients, the alone sums, their gradients) with ``kernel`` tried first."""
    collate = PackedCollator(tok.pad_token_id, pack=True, mask_kind="varlen", capacity=capacity)
    packed = collate(feats)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] < len(feats)
    with varlen.varlen_attention(model, kernel):
        loss, n = _loss(model, dict(packed), device)
        loss.backward()
    packed_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    alone, count = 0.0, 0
    for f in feats:  # each example alone, on the model's own attention (no packing, nothing to keep apart)
        lo, k = _loss(model, PackedCollator(tok.pad_token_id, pack=False, mask_kind="none")([f]), device)
        lo.backward()
        alone, count = alone + lo.item(), count + k
    assert n == count
    return loss.item(), packed_grads, alone, {k: p.grad for k, p in model.named_parameters()}


def _assert_close(loss, grads, alone, alone_grads):
    """fp32: the summed loss to 1e-5 relative, every gradient to 1e-3 of its largest entry (a leak moves the loss by
    ~4e-4 relative: tests/test_train_sft.py)."""
    assert loss == pytest.approx(alone, rel=1e-5)
    for name, g in alone_grads.items():
        assert (grads[name] - g).abs().max().item() <= 1e-3 * g.abs().max().item() + 1e-7, name


def test_the_collator_gives_each_examples_boundaries_and_no_mask(tiny_model_dir):
    tok, feats = _features(tiny_model_dir)
    lengths = [len(f["input_ids"]) for f in feats]
    rows = PackedCollator(tok.pad_token_id, mask_kind="varlen")(feats)
    width = rows["input_ids"].shape[1]
    cu = rows["cu_seq_lens_q"]
    assert cu.dtype == torch.int32 and rows["cu_seq_lens_k"] is cu and "attention_mask" not in rows
    assert cu[0] == 0 and cu[-1] == rows["input_ids"].numel() and bool((cu[1:] > cu[:-1]).all())
    assert set((cu[1:] // width).tolist()) | {0} >= set(range(rows["input_ids"].shape[0]))  # every row ends a segment
    assert rows["max_length_q"] == rows["max_length_k"] == max(max(lengths), int((cu[1:] - cu[:-1]).max()))
    assert isinstance(rows["max_length_q"], int)  # a Python int: the kernel sizes nothing from the device
    # each segment's position ids restart at 0 and run up by one
    flat = rows["position_ids"].flatten()
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        if flat[start:end].any():
            assert flat[start:end].tolist() == list(range(end - start))
    one = PackedCollator(tok.pad_token_id, mask_kind="varlen", capacity=sum(lengths))(feats)  # one row, no padding
    assert one["input_ids"].shape == (1, sum(lengths)) and len(one["cu_seq_lens_q"]) == len(feats) + 1


@pytest.mark.parametrize("capacity", [None, 4096])
def test_packed_on_the_sdpa_kernel_equals_one_at_a_time_loss_and_gradients(tiny_model_dir, capacity):
    """Rows of the longest example (padding tails as segments of their own), and the whole batch as one row."""
    tok, feats = _features(tiny_model_dir)
    model = _model(tiny_model_dir)
    before = model.config._attn_implementation
    varlen.STATE.used.clear()
    _assert_close(*_packed_vs_alone(model, tok, feats, "sdpa", capacity))
    assert varlen.STATE.used == {"sdpa": 2}  # one call per layer, on the CPU's kernel
    assert model.config._attn_implementation == before  # the model's own attention is back


def test_a_sliding_window_and_grouped_heads_stay_apart_too(tiny_model_dir):
    """A window shorter than the examples (Mistral-style local attention) and 4 query heads per key head: the packed
    loss equals each example alone under the model's own SDPA with the same window; control: the window acts."""
    tok, feats = _features(tiny_model_dir)
    assert min(len(f["input_ids"]) for f in feats) > 6
    model = _model(tiny_model_dir, window=6, kv_heads=1)
    _assert_close(*_packed_vs_alone(model, tok, feats, "sdpa"))
    wide = _model(tiny_model_dir, window=4096, kv_heads=1)
    with torch.no_grad():
        windowed = sum(_loss(model, PackedCollator(tok.pad_token_id, pack=False, mask_kind="none")([f]))[0].item()
                       for f in feats)
        full = sum(_loss(wide, PackedCollator(tok.pad_token_id, pack=False, mask_kind="none")([f]))[0].item()
                   for f in feats)
    assert abs(windowed - full) > 1e-3 * abs(full)


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False,
                      **_):
    """A reference of ``varlen_attn``'s contract (torch ≥ 2.12), segment by segment with SDPA, at the seam where
    the real kernel needs CUDA: (T, H, D) inputs, int32 offsets, window (left, 0) causal."""
    assert q.dim() == 3 and cu_q.dtype == torch.int32 and isinstance(max_q, int) and window_size[1] == 0
    assert enable_gqa or k.shape[1] == q.shape[1]
    out = []
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
        assert e - s <= max_q
        n = e - s
        allowed = torch.ones(n, n, dtype=torch.bool).tril()
        if window_size[0] >= 0:
            allowed &= (torch.arange(n)[:, None] - torch.arange(n)[None, :]) <= window_size[0]
        out.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale,
                                                                    enable_gqa=enable_gqa).transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("params", [("scale", "window_size", "enable_gqa"), ("scale", "window_size"),
                                    ("is_causal",)])
def test_the_torch_kernels_calling_convention_across_releases(tiny_model_dir, monkeypatch, params):
    """torch 2.12+ (GQA asked), 2.11 (key/value heads repeated here) and 2.10 (``is_causal``, no scale: runs only
    with the default scale): the layout, offsets and arguments handed to ``varlen_attn`` give the loss and gradients
    of one example at a time (checked with a reference kernel in its place on this CPU)."""
    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        assert set(kw) <= set(params)
        if "is_causal" in kw:
            kw = {"window_size": (-1, 0)} if kw.pop("is_causal") else {}
        return _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    monkeypatch.setattr(varlen, "torch_varlen", lambda: (kernel, frozenset(params)))
    monkeypatch.setattr(varlen, "_half_on_cuda", lambda query: True)
    tok, feats = _features(tiny_model_dir)
    model = _model(tiny_model_dir)
    varlen.STATE.used.clear()
    _assert_close(*_packed_vs_alone(model, tok, feats, "torch", capacity=4096))
    assert varlen.STATE.used == {"torch": 2}


def test_a_batch_without_boundaries_is_refused_not_mixed(tiny_model_dir):
    from tunesmith.errors import TrainingError

    tok, feats = _features(tiny_model_dir)
    model = _model(tiny_model_dir)
    batch = PackedCollator(tok.pad_token_id, mask_kind="none")(feats)  # position ids only
    with varlen.varlen_attention(model, "sdpa"), pytest.raises(TrainingError, match="cu_seq_lens_q"):
        _loss(model, batch)


def test_transformers_packed_check_never_runs_and_a_step_reads_nothing(tiny_model_dir, monkeypatch):
    """transformers' ``find_packed_sequence_indices`` (its ``.all()`` waits for a GPU) is not called on this path,
    where it is without it; the forward and backward read no tensor value on the host."""
    import transformers.masking_utils as masking

    calls = []
    original = masking.find_packed_sequence_indices
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda *a, **k: calls.append(1) or original(*a, **k))
    tok, feats = _features(tiny_model_dir)
    model = _model(tiny_model_dir)
    varlen_batch = PackedCollator(tok.pad_token_id, mask_kind="varlen")(feats)
    reads = StepReads("cpu")
    with reads, varlen.varlen_attention(model, "sdpa"):
        reads.active = True
        loss, _ = _loss(model, dict(varlen_batch))
        loss.backward()
        reads.active, reads.steps = False, 1
    assert not calls and not reads.sites, reads.sites
    _loss(model, PackedCollator(tok.pad_token_id, mask_kind="none")(feats))  # the position-ids path: it runs
    assert calls


def test_the_sft_trainer_trains_on_it_and_puts_the_models_attention_back(tiny_model_dir, tmp_path):
    """build_trainer on a path that packs with variable-length attention: the collator gives boundaries, training
    runs on the registered function (no read per step), and afterwards the model answers on its own attention."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.config import validate_recipe
    from tunesmith.machine.device import Capabilities, Wishes, choose_path
    from tunesmith.machine.placement import Placement
    from tunesmith.train.sft import build_trainer, prepare_model

    path = replace(choose_path(Capabilities(), Wishes()), packing="varlen", varlen="sdpa", loss="chunked",
                   optimizer="adamw_torch_fused")  # fused AdamW keeps its step counts on the device, as on a GPU
    recipe = validate_recipe({"name": "v", "output_dir": str(tmp_path), "model": {"name": str(tiny_model_dir)},
                              "data": {"path": "unused", "input_fields": ["text"], "target_field": "y"},
                              "train": {"max_steps": 3, "batch_size": 4, "logging_steps": 1, "max_seq_length": 96,
                                        "optimizer": "adamw_torch_fused", "learning_rate": 1e-3}})
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.padding_side = "right"
    model = prepare_model(recipe, AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    rows = [{"prompt": p, "completion": c} for p, c in (_conv(r["text"], r["category"])
                                                         for r in banking_rows(LABELS, 6))]
    trainer = build_trainer(recipe, model, tok, rows, [], Placement("cpu", "float32", path), tmp_path,
                            save_strategy="no")
    assert trainer.data_collator.mask_kind == "varlen"
    reads = StepReads("cpu")
    trainer.add_callback(reads.callback())
    varlen.STATE.used.clear()
    with reads:
        trainer.train()
    assert reads.steps == 3 and not reads.sites, reads.sites
    assert varlen.STATE.used["sdpa"] > 0
    assert model.get_base_model().config._attn_implementation == "sdpa"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(v == v for v in losses)


def _per_target(model, batch: dict, kernel: str, device: str):
    """Each target's log-probability (in the batch's target order) and the gradients of their summed loss, with
    ``kernel`` tried first."""
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    inputs = {k: v for k, v in batch.items()
              if k not in ("labels", "shift_labels", "num_tokens", "logits_mask", "target_index")}
    with varlen.varlen_attention(model, kernel):
        out = model(**inputs, target_index=batch["target_index"], target_labels=batch["labels"])
        (-out.log_probs.float().sum()).backward()
    grads = {k: p.grad.float().clone() for k, p in model.named_parameters()}
    model.zero_grad()
    return out.log_probs.detach().float(), grads


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: the variable-length kernels run only there "
                                     "(bash scripts/gpu_run.sh verify)")
@pytest.mark.parametrize("kernel", ["torch", pytest.param("flash_attn", marks=pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed"))])
def test_the_gpu_kernel_runs_and_keeps_the_examples_apart(tiny_model_dir, kernel):
    """On the GPU: PyTorch's ``varlen_attn`` (or FlashAttention's) runs, not a fallback, on the whole batch as one row
    in fp16, and gives each target the log-probability (and the loss its gradients) of the SDPA kernel with the block
    mask, which equals one example at a time (the CPU tests above), with and without a sliding window and grouped
    heads; control: told that the row is one sequence, the same kernel lets the examples see each other (on a CPU
    that moved the log-probabilities by 0.02 on average, 0.07 at most; fp16 rounding 0.001, bf16 0.002); no host
    sync in the forward and backward (PyTorch's own check)."""
    if kernel == "torch" and varlen.torch_varlen() is None:
        pytest.fail(f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn")
    tok, feats = _features(tiny_model_dir)
    batch = PackedCollator(tok.pad_token_id, mask_kind="varlen", capacity=4096)(feats)
    assert batch["input_ids"].shape[0] == 1 and len(batch["cu_seq_lens_q"]) == len(feats) + 1
    for window in (None, 6):
        model = _model(tiny_model_dir, "cuda", torch.float16, window=window, kv_heads=1 if window else None)
        varlen.STATE.used.clear()
        ours, ours_grads = _per_target(model, batch, kernel, "cuda")
        assert varlen.STATE.used == {kernel: 2}, varlen.STATE.used  # the kernel itself ran, in both layers
        masked, masked_grads = _per_target(model, batch, "sdpa", "cuda")
        assert (ours - masked).abs().max().item() < 1e-2
        for name, g in masked_grads.items():
            assert (ours_grads[name] - g).abs().max().item() <= 2e-2 * g.abs().max().item() + 1e-4, name
        if window is None:
            whole = torch.tensor([0, batch["input_ids"].numel()], dtype=torch.int32)
            leaky = batch | {"cu_seq_lens_q": whole, "cu_seq_lens_k": whole, "max_length_q": batch["input_ids"].numel(),
                             "max_length_k": batch["input_ids"].numel()}
            assert (_per_target(model, leaky, kernel, "cuda")[0] - masked).abs().mean().item() > 5e-3
    on_device = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    reads = StepReads("cuda")
    with reads, varlen.varlen_attention(model, kernel):
        reads.active = True
        loss, _ = _loss(model, on_device, "cuda")
        loss.backward()
        reads.active, reads.steps = False, 1
        torch.cuda.synchronize()
    assert not reads.sites, reads.sites
