"""The GPU training path on a real CUDA GPU: packed rows isolated under the kernels it picks (forward and backward),
the path tunesmith chooses stated and trained end to end (LoRA, QLoRA, the classifier head, DPO), and no host
read inside a training step. Skipped without CUDA (CI has none); run on a GPU machine with
``bash scripts/gpu_run.sh python -m pytest -q tests/test_gpu_path.py`` (docs/train.md, "On a GPU")."""

import importlib.util
import json
import math

import pytest
import torch

from tunesmith.data.formats.chat_rows import tokenize_example
from tunesmith.machine import varlen
from tunesmith.machine.packing import PackedCollator
from tunesmith.machine.syncs import StepReads
from tunesmith.train.trainer import completion_loss

from .conftest import banking_rows, write_recipe
from .test_host_reads import _recipe as reads_recipe
from .test_train_sft import LABELS, _conv
from .test_train_sft import _recipe as sft_recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU training path)")
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _model(tiny_model_dir, attn: str, dtype, liger: bool):
    from transformers import AutoModelForCausalLM

    from tunesmith.train.chunked_loss import add_target_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn, dtype=dtype).cuda()
    if liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False)
    add_target_head(model)
    return model


def _features(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = sorted(banking_rows(LABELS, 20), key=lambda r: len(r["text"]))
    return tok, [tokenize_example(*_conv(r["text"], r["category"]), tok) for r in rows[:6] + rows[-2:]]


def _summed_loss(model, batch: dict):
    """The summed target loss of ``batch`` (the path's chunked form) and its target count."""
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    loss, _, n = completion_loss(model, batch, num_items_in_batch=1, form="chunked")
    return loss, n


@pytest.mark.parametrize("liger", [False, pytest.param(True, marks=pytest.mark.skipif(not HAS_LIGER, reason="no liger"))])
@pytest.mark.parametrize("attn", ["flex_attention", "sdpa"])
def test_packed_equals_one_at_a_time_forward_and_backward_on_the_gpu(tiny_model_dir, attn, liger):
    """The GPU path packs by restarting position ids with no mask from the collator; flex attention (and SDPA,
    where transformers builds the mask on the GPU) must keep the examples apart in the backward pass too: the packed
    rows' summed loss and every gradient equal the sums over the examples run alone (fp32, so that the kernels'
    rounding stays far below what a leak would move)."""
    torch.backends.cuda.matmul.allow_tf32 = False  # full fp32 (a training test before may have turned TF32 on)
    tok, feats = _features(tiny_model_dir)
    model = _model(tiny_model_dir, attn, torch.float32, liger)
    collate = PackedCollator(tok.pad_token_id, pack=True, mask_kind="none")
    packed = collate(feats)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] < len(feats)
    loss, n = _summed_loss(model, dict(packed))
    loss.backward()
    packed_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    alone, count = 0.0, 0
    for f in feats:
        lo, k = _summed_loss(model, collate([f]))
        lo.backward()
        alone, count = alone + lo.item(), count + k
    assert n == count
    assert loss.item() == pytest.approx(alone, rel=2e-5)
    for name, p in model.named_parameters():
        scale = p.grad.abs().max().item()
        assert (packed_grads[name] - p.grad).abs().max().item() <= 1e-3 * scale + 1e-6, name

    leaky = dict(packed)  # control: position ids that never restart let the examples see each other
    leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1]).expand_as(leaky["input_ids"])
    with torch.no_grad():  # (0.14 of 366 on a CPU: 20x the tolerance above)
        assert abs(_summed_loss(model, leaky)[0].item() - alone) > 0.05


@pytest.mark.parametrize("attn", ["flex_attention", "sdpa"])
def test_packed_equals_one_at_a_time_in_bf16_on_the_gpu(tiny_model_dir, attn):
    """The same in the path's bf16 (with Liger where installed), within bf16's rounding."""
    tok, feats = _features(tiny_model_dir)
    model = _model(tiny_model_dir, attn, torch.bfloat16, HAS_LIGER)
    collate = PackedCollator(tok.pad_token_id, pack=True, mask_kind="none")
    with torch.no_grad():
        packed, _ = _summed_loss(model, dict(collate(feats)))
        alone = sum(_summed_loss(model, collate([f]))[0].item() for f in feats)
    assert packed.item() == pytest.approx(alone, rel=1e-2)


def _train(cli, tmp_path, recipe_doc: dict) -> dict:
    recipe_doc["train"].setdefault("path", "fast")  # the fast path under test, verified on this GPU kind or not
    code, out = cli(["train", str(write_recipe(tmp_path / "r.yaml", recipe_doc))])
    assert code == 0, out
    return json.loads((tmp_path / "runs" / recipe_doc["name"] / "train" / "summary.json").read_text())


def _sft_doc(tmp_path, tiny_model_dir, **train) -> dict:
    import yaml

    return yaml.safe_load(sft_recipe(tmp_path, tiny_model_dir, **{"path": "fast", **train}).read_text())


@pytest.mark.parametrize("adapter", ["lora", pytest.param("qlora", marks=pytest.mark.skipif(not HAS_BNB,
                                                                                           reason="no bitsandbytes"))])
def test_the_gpu_path_is_chosen_stated_and_trains(cli, tmp_path, tiny_model_dir, adapter):
    summary = _train(cli, tmp_path, _sft_doc(tmp_path, tiny_model_dir, adapter=adapter, max_steps=8,
                                             eval_steps=None, logging_steps=1))
    path = summary["train_path"]
    assert (path["device"], path["dtype"], path["tf32"]) == ("cuda", "bfloat16", True)
    assert (path["attention"], path["packing"], path["loss"]) == ("sdpa", "varlen", "chunked")
    assert path["varlen"] == ("torch" if varlen.torch_varlen() else "sdpa")  # PyTorch's own kernel where it has it
    assert path["kernels"] == ("liger" if HAS_LIGER else "none")
    assert path["gradient_checkpointing"] is False  # a tiny model fits
    if adapter == "qlora":
        assert path["optimizer"] == "paged_adamw_8bit" and path["quantization"]["quant_type"] == "nf4"
    else:
        assert path["optimizer"] == "adamw_torch_fused" and path["quantization"] is None
    assert summary["peak_memory_mb"] > 0 and summary["tokens"] > 0
    assert summary["trainable_tensors_changed"] == summary["trainable_tensors"]  # every adapter tensor moved
    losses = [float(r["train_loss"]) for r in _metrics(tmp_path) if r["train_loss"]]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)


def _metrics(tmp_path) -> list[dict]:
    import csv

    with open(tmp_path / "runs/tiny-train/train/metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_memory_limit_turns_gradient_checkpointing_on_and_holds_the_process(tmp_path, tiny_model_dir):
    """train.memory_limit_gb: the estimate is made against the limit (here below what the batch needs, so
    checkpointing is chosen), and the process cannot allocate past it."""
    from tunesmith.config import validate_recipe
    from tunesmith.machine.path import decide, hold_memory_limit

    recipe = validate_recipe(_sft_doc(tmp_path, tiny_model_dir, memory_limit_gb=0.001))
    path = decide(recipe)
    assert path.gradient_checkpointing and "estimate" in path.reasons["gradient_checkpointing"]
    assert not decide(validate_recipe(_sft_doc(tmp_path, tiny_model_dir))).gradient_checkpointing
    try:
        assert hold_memory_limit(recipe, path) < 1e-3
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(2**30, dtype=torch.uint8, device="cuda")  # 1 GiB > the limit
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


@pytest.mark.parametrize("kind", ["generative", "classifier", "dpo"])
def test_training_steps_make_no_host_sync_on_the_gpu(cli, tmp_path, tiny_model_dir, monkeypatch, kind):
    """PyTorch's own check of synchronising operations (CUDA) over every training step: none on the GPU path."""
    import tunesmith.train.sft as sft

    fit = sft.fit
    reads = StepReads("cuda")
    monkeypatch.setattr(sft, "fit", lambda trainer, out, resume, bar, callbacks=None: fit(
        trainer, out, resume, bar, [*(callbacks or []), reads.callback()]))
    doc = reads_recipe(tmp_path, tiny_model_dir, kind)
    doc["train"]["path"] = "fast"
    with reads:
        code, out = cli(["train", str(write_recipe(tmp_path / "r.yaml", doc))])
    assert code == 0, out
    assert reads.steps == 4 and not reads.sites, reads.sites
    summary = json.loads((tmp_path / "runs/reads/train/summary.json").read_text())
    assert summary["train_path"]["device"] == "cuda" and summary["train_path"]["dtype"] == "bfloat16"


@pytest.mark.skipif(not HAS_BNB, reason="no bitsandbytes")
def test_a_classifier_head_trains_on_a_4bit_decoder(cli, tmp_path, tiny_model_dir):
    """head + QLoRA: the decoder's linear layers in NF4, LoRA and the head layer trained, every tensor moved; the
    saved head then predicts through the evaluation's loader (a bf16 base with the adapter)."""
    from tunesmith.models.head_predictor import HeadPredictor

    doc = reads_recipe(tmp_path, tiny_model_dir, "classifier")
    doc["train"] |= {"adapter": "qlora", "optimizer": "auto"}
    summary = _train(cli, tmp_path, doc)
    assert summary["train_path"]["quantization"]["quant_type"] == "nf4"
    assert summary["trainable_tensors_changed"] == summary["trainable_tensors"]
    predictor = HeadPredictor(tmp_path / "runs/reads/train/classifier")
    assert set(predictor.predict_texts(["my card has not arrived", "my pin is blocked"])) <= {"card_arrival",
                                                                                            "pin_blocked"}
