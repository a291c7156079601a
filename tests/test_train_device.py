"""The training-path decision: one pure function of the machine's capabilities and the recipe's wishes.
A CPU keeps exactly today's choices; a CUDA GPU where the fast path is verified gets bf16, TF32, fused AdamW, the
fastest attention, position-id packing, Liger where installed, checkpointing only when memory is short, QLoRA's
settings; an unverified one trains on the reference path unless the recipe says train.path: fast."""


import pytest

from tunesmith.config import validate_recipe
from tunesmith.errors import ConfigError
from tunesmith.machine.device import Capabilities, TrainPath, Wishes, choose_path, probe
from tunesmith.machine.path import decide
from tunesmith.machine.placement import Placement

CPU = Capabilities()
H100 = Capabilities(cuda=True, bf16=True, compute_capability=(9, 0), flex_attention=True, liger=True,
                    bitsandbytes=True, free_memory=78 * 2**30, device_name="NVIDIA H100", fast_path_verified=True)
T4 = Capabilities(cuda=True, bf16=False, compute_capability=(7, 5), flash_attn=True, bitsandbytes=True,
                  fast_path_verified=True)


def test_cpu_path_is_todays_behaviour():
    p = choose_path(CPU, Wishes())
    assert (p.device, p.dtype, p.tf32, p.optimizer) == ("cpu", "float32", False, "adamw_torch")
    assert (p.attention, p.attn_implementation, p.packing, p.mask_in_collator) == ("default", None, "block_mask", True)
    assert (p.kernels, p.gradient_checkpointing, p.quantization) == ("none", False, None)
    # on a CPU, memory pressure halves the micro-batch (fit_micro_batch); checkpointing stays off
    assert choose_path(CPU, Wishes(), fits_without_checkpointing=False).gradient_checkpointing is False
    assert choose_path(Capabilities(liger=True), Wishes()).kernels == "none"  # Liger is Triton: GPU only


def test_gpu_path_bf16_tf32_fused_adamw_sdpa_position_ids_liger():
    p = choose_path(H100, Wishes(), fits_without_checkpointing=True)
    assert (p.device, p.dtype, p.tf32, p.optimizer) == ("cuda", "bfloat16", True, "adamw_torch_fused")
    assert (p.attention, p.packing, p.mask_in_collator, p.kernels) == ("sdpa", "varlen", False, "liger")
    assert p.gradient_checkpointing is False and "fits" in p.reasons["gradient_checkpointing"]
    assert set(p.reasons) >= {"dtype", "tf32", "optimizer", "attention", "packing", "kernels"}
    short = choose_path(H100, Wishes(), fits_without_checkpointing=False)
    assert short.gradient_checkpointing is True and "not fit" in short.reasons["gradient_checkpointing"]
    no_liger = choose_path(Capabilities(cuda=True, bf16=True, compute_capability=(8, 0)), Wishes(path="fast"))
    assert no_liger.kernels == "none" and "not installed" in no_liger.reasons["kernels"]


def test_attention_order_flash_then_sdpa_and_flex_only_for_softcapping_models():
    flash = Capabilities(**{**H100.__dict__, "flash_attn": True})
    no_flex = Capabilities(**{**H100.__dict__, "flex_attention": False})
    assert choose_path(flash, Wishes()).attention == "flash_attention_2"
    packed = choose_path(H100, Wishes())  # no flash-attn: SDPA (flex measured 4x slower on an H200), and why
    assert packed.attention == "sdpa" and "4x slower on an H200" in packed.reasons["attention"]
    assert choose_path(no_flex, Wishes()).attention == "sdpa"
    assert choose_path(H100, Wishes(packing=False)).attention == "sdpa"  # unpacked: SDPA's own kernels
    assert choose_path(H100, Wishes(head="classifier")).attention == "sdpa"
    t4 = choose_path(T4, Wishes())  # FlashAttention-2 needs Ampere; a T4 has no bf16 and no TF32
    assert (t4.attention, t4.dtype, t4.tf32) == ("sdpa", "float32", False)
    gemma = Wishes(softcapping=True)  # Gemma-2 soft-caps attention logits, which SDPA ignores
    assert choose_path(H100, gemma).attention == "flex_attention"
    assert choose_path(Capabilities(**{**H100.__dict__, "flex_attention": False}), gemma).attention == "eager"
    assert choose_path(flash, gemma).attention == "flash_attention_2"
    assert choose_path(H100, Wishes(softcapping=True, head="classifier")).attention == "flex_attention"


def test_packed_rows_on_a_gpu_run_on_variable_length_attention_with_the_best_kernel_there():
    """The collator's boundaries, never transformers' position-ids check: PyTorch's varlen_attn where this torch and
    GPU have it and matmuls run in bf16 (full fine-tuning's autocast too), FlashAttention's where the model loads with
    it, SDPA's masked kernel where SDPA is asked, on fp32 GPUs and where torch lacks the kernel; soft-capping models
    stay on flex attention and position ids; the reference path and unpacked methods have none; a CPU keeps its mask."""
    varlen = Capabilities(**{**H100.__dict__, "varlen_attn": True})
    p = choose_path(varlen, Wishes(), fits_without_checkpointing=True)
    assert (p.attention, p.packing, p.varlen, p.attention_kernel) == ("sdpa", "varlen", "torch", "varlen")
    assert "varlen_attn" in p.reasons["packing"] and "packing varlen (torch)" in p.describe()
    assert choose_path(varlen, Wishes(adapter="full")).varlen == "torch"  # fp32 master weights, bf16 autocast
    assert choose_path(varlen, Wishes(precision="fp32")).varlen == "sdpa"  # varlen_attn runs bf16/fp16 only
    assert choose_path(varlen, Wishes(attention="sdpa")).varlen == "sdpa"
    flash = choose_path(Capabilities(**{**varlen.__dict__, "flash_attn": True}), Wishes())
    assert (flash.attention, flash.packing, flash.varlen) == ("flash_attention_2", "varlen", "flash_attn")
    plain = choose_path(H100, Wishes())  # torch without varlen_attn (< 2.10) or a GPU before Ampere
    assert (plain.packing, plain.varlen, plain.attention_kernel) == ("varlen", "sdpa", "sdpa")
    gemma = choose_path(varlen, Wishes(softcapping=True))
    assert (gemma.attention, gemma.packing, gemma.varlen) == ("flex_attention", "position_ids", None)
    assert choose_path(varlen, Wishes(attention="eager")).packing == "position_ids"
    for unpacked in (Wishes(packing=False), Wishes(head="classifier"), Wishes(path="reference")):
        assert choose_path(varlen, unpacked).varlen is None
    cpu = choose_path(CPU, Wishes())
    assert (cpu.packing, cpu.varlen) == ("block_mask", None)


def test_flex_attention_asked_on_a_cpu_is_a_config_error():
    with pytest.raises(ConfigError, match="flex_attention cannot train on a CPU"):
        choose_path(CPU, Wishes(attention="flex_attention"))
    with pytest.raises(ConfigError, match="needs torch's flex attention and Triton"):
        choose_path(Capabilities(**{**H100.__dict__, "flex_attention": False}), Wishes(attention="flex_attention"))
    assert choose_path(H100, Wishes(attention="flex_attention")).attention == "flex_attention"


def test_full_fine_tuning_on_a_gpu_keeps_fp32_master_weights_under_bf16_autocast(tmp_path):
    from tunesmith.train.sft import base_args

    p = choose_path(H100, Wishes(adapter="full"))
    assert (p.dtype, p.autocast) == ("float32", "bfloat16") and "master weights" in p.reasons["dtype"]
    assert base_args(_recipe(adapter="full"), Placement("cuda", "float32", p), tmp_path)["bf16"] is True
    assert choose_path(H100, Wishes(adapter="full", precision="bf16")).autocast is None  # asked: pure bf16
    assert choose_path(CPU, Wishes(adapter="full")).autocast is None


def test_qlora_settings_and_refusals():
    q = choose_path(H100, Wishes(adapter="qlora"))
    assert q.quantization == {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    assert q.optimizer == "paged_adamw_8bit" and q.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="qlora needs a CUDA GPU"):
        choose_path(CPU, Wishes(adapter="qlora"))
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        choose_path(Capabilities(**{**H100.__dict__, "bitsandbytes": False}), Wishes(adapter="qlora"))


def test_kernels_liger_asked_but_missing_is_a_clear_config_error():
    with pytest.raises(ConfigError, match="train.kernels: liger needs liger-kernel: pip install liger-kernel"):
        choose_path(Capabilities(**{**H100.__dict__, "liger": False}), Wishes(kernels="liger"))
    with pytest.raises(ConfigError, match="train.kernels: liger needs a CUDA GPU"):
        choose_path(CPU, Wishes(kernels="liger"))
    assert choose_path(H100, Wishes(kernels="none")).kernels == "none"
    with pytest.raises(ConfigError, match="flash_attention_2 needs a CUDA GPU and the flash-attn package"):
        choose_path(H100, Wishes(attention="flash_attention_2"))


def test_what_the_recipe_asks_for_wins():
    p = choose_path(H100, Wishes(optimizer="adamw_torch", gradient_checkpointing=True, attention="eager",
                                 precision="fp32", packing=False))
    assert (p.optimizer, p.gradient_checkpointing, p.attention, p.dtype, p.packing) == (
        "adamw_torch", True, "eager", "float32", "off")
    assert choose_path(CPU, Wishes(gradient_checkpointing=True)).gradient_checkpointing is True
    for head in ("classifier", "regression", "span"):  # every head reads one example per row
        p = choose_path(H100, Wishes(head=head))
        assert p.packing == "off" and head in p.reasons["packing"], p.reasons
    assert choose_path(CPU, Wishes(head="generative")).packing == "block_mask"
    for caps in (CPU, H100):  # DPO pads each chosen and rejected sequence to its own row: SDPA, no flex
        p = choose_path(caps, Wishes(method="dpo"))
        assert p.packing == "off" and "DPO" in p.reasons["packing"], p.reasons
    assert choose_path(H100, Wishes(method="dpo")).attention == "sdpa"
    assert choose_path(H100, Wishes(method="dpo", softcapping=True)).attention == "flex_attention"


def _recipe(**train):
    return validate_recipe({"name": "x", "data": {"path": "d.csv", "input_fields": ["text"], "target_field": "y"},
                            "train": train})


def test_loss_form_chunked_unless_asked_a_head_its_own():
    for caps in (CPU, H100):
        assert choose_path(caps, Wishes()).loss == "chunked" and "no logits held" in choose_path(caps, Wishes()).reasons["loss"]
        assert choose_path(caps, Wishes(loss="logits")).loss == "logits"
        assert choose_path(caps, Wishes(head="classifier", loss="logits")).loss == "head"
        assert choose_path(caps, Wishes(method="dpo", loss="logits")).loss == "chunked"  # TRL's fused head


def test_this_machine_and_the_trainer_arguments_follow_the_path(tiny_model_dir, tmp_path):
    from tunesmith.train.sft import base_args

    recipe = _recipe().model_copy(update={"model": _recipe().model.model_copy(update={"name": str(tiny_model_dir)})})
    if probe().cuda:
        pytest.skip("this check is for a CPU machine; the GPU branches are covered by choose_path above")
    assert decide(recipe) == choose_path(CPU, Wishes())
    today = base_args(recipe, Placement("cpu", "float32"), tmp_path)  # no path: exactly as before
    cpu = base_args(recipe, Placement("cpu", "float32", decide(recipe)), tmp_path)
    assert today == cpu and cpu["optim"] == "adamw_torch" and cpu["tf32"] is None and not cpu["use_liger_kernel"]
    gpu_path = choose_path(H100, Wishes(), fits_without_checkpointing=False)
    gpu = base_args(recipe, Placement("cuda", "bfloat16", gpu_path), tmp_path)
    assert (gpu["optim"], gpu["tf32"], gpu["bf16"], gpu["use_liger_kernel"], gpu["activation_checkpointing"]) == (
        "adamw_torch_fused", True, True, True, True)
    assert gpu["liger_kernel_config"]["fused_linear_cross_entropy"] is False  # Liger's would score every position
    assert TrainPath(**gpu_path.to_json()) == gpu_path  # summary.json round-trips


def test_estimate_on_a_gpu_keeps_no_attention_probabilities():
    from tunesmith.machine.estimate import Shape, estimate

    shape = Shape(params=10**9, hidden=2048, intermediate=8192, layers=16, heads=32, kv_dim=512, vocab=128256,
                  linear_shapes=[(2048, 2048)] * 64)
    recipe = _recipe(max_seq_length=2048, batch_size=1)
    cpu, gpu = estimate(shape, recipe, "float32", "cpu"), estimate(shape, recipe, "bfloat16", "cuda")
    assert gpu.parts["attention"] == 2048**2  # SDPA: one bool mask at most
    for kernel in ("flex_attention", "flash_attention_2"):  # a block mask of 128x128 blocks, or none
        assert estimate(shape, recipe, "bfloat16", "cuda", attention=kernel).parts["attention"] == 0
    # eager on a GPU (a soft-capping model without flex): bf16 probabilities and their softmax, every layer
    assert estimate(shape, recipe, "bfloat16", "cuda", attention="eager").parts["attention"] == 32 * 2048**2 * 2 * 2 * 16
    assert cpu.parts["attention"] == 2048**2 * 4 * 16  # SDPA on a CPU: the mask as floats, once per layer
    eager = estimate(shape, _recipe(max_seq_length=2048, batch_size=1, attention="eager"), "float32", "cpu")
    assert eager.parts["attention"] == 32 * 2048**2 * 4 * 2 * 16  # the probabilities of every head and layer
    assert gpu.parts["weights"] == cpu.parts["weights"] // 2


def _qlora_8b(tiny_model_dir, **train):
    return validate_recipe({"name": "x", "model": {"name": f"random:llama-3.1-8b?tokenizer={tiny_model_dir}"},
                            "data": {"path": "d.csv", "input_fields": ["text"], "target_field": "y"},
                            "train": {"adapter": "qlora", "batch_size": 1, "max_seq_length": 2048,
                                      "lora": {"dropout": 0.0}} | train})


def test_a_memory_limit_plans_for_a_smaller_gpu(home, tiny_model_dir):
    """Llama-3.1-8B QLoRA, one 2,048-token row: on an 80 GB H100 the batch fits without gradient checkpointing;
    with train.memory_limit_gb: 8 (the GPU the benchmark's 8b-qlora plans for) the estimate says it does not, and
    checkpointing is chosen. On a CPU the limit changes nothing (it is a GPU setting) and holds nothing."""
    from tunesmith.machine.estimate import memory_budget
    from tunesmith.machine.path import hold_memory_limit

    assert decide(_qlora_8b(tiny_model_dir), H100).gradient_checkpointing is False
    limited = decide(_qlora_8b(tiny_model_dir, memory_limit_gb=8), H100)
    assert limited.gradient_checkpointing and "would not fit" in limited.reasons["gradient_checkpointing"]
    assert memory_budget(78 * 2**30, 8, "cuda") == 8 * 2**30 and memory_budget(4 * 2**30, 8, "cuda") == 4 * 2**30
    assert memory_budget(None, 8, "cuda") == 8 * 2**30 and memory_budget(2**30, 8, "cpu") == 2**30
    lora = _qlora_8b(tiny_model_dir, adapter="lora", memory_limit_gb=8)
    assert hold_memory_limit(lora, choose_path(CPU, Wishes())) is None


def test_a_4bit_head_keeps_its_head_layer_out_of_quantization(tiny_model_dir):
    """QLoRA under a task head: the head layer trains, so it must not become 4-bit. transformers' own rule keeps
    the last parameter's module, which for the span head is ``qa_outputs.bias`` (no module of that name), so the
    span head's layer would be quantized; tunesmith names every task head's layer (HEAD_LAYERS) and the decoder's
    linear layers still go to 4 bits."""
    from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoModelForSequenceClassification
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    from tunesmith.models.loading import HEAD_LAYERS

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    for auto, head in ((AutoModelForQuestionAnswering, "qa_outputs"), (AutoModelForSequenceClassification, "score")):
        model = auto.from_config(cfg)
        ours = HfQuantizer.get_modules_to_not_convert(model, HEAD_LAYERS)
        assert not should_convert_module(head, ours)
        assert should_convert_module("model.layers.0.mlp.down_proj", ours)
        assert should_convert_module("model.layers.1.self_attn.q_proj", ours)
    qa = AutoModelForQuestionAnswering.from_config(cfg)
    assert should_convert_module("qa_outputs", HfQuantizer.get_modules_to_not_convert(qa))  # transformers' rule misses it


UNVERIFIED = Capabilities(**{**H100.__dict__, "fast_path_verified": False})


def test_auto_on_an_unverified_gpu_takes_the_reference_path_and_says_why():
    p = choose_path(UNVERIFIED, Wishes(), fits_without_checkpointing=True)
    assert p.name == "reference" and (p.packing, p.loss) == ("off", "logits")
    why = p.reasons["path"]
    assert "no recorded verification on NVIDIA H100" in why and "train.path: fast" in why
    assert p.describe().startswith(why)  # the training path line and summary.json say it
    fast = choose_path(UNVERIFIED, Wishes(path="fast"), fits_without_checkpointing=True)
    assert fast.name == "fast" and (fast.packing, fast.loss) == ("varlen", "chunked") and "path" not in fast.reasons
    chats = choose_path(UNVERIFIED, Wishes(fast_only="only it trains conversation rows"), fits_without_checkpointing=True)
    assert chats.name == "fast" and "only it trains conversation rows" in chats.reasons["path"]
    assert choose_path(H100, Wishes(), fits_without_checkpointing=True).name == "fast"  # verified on this kind
    assert choose_path(CPU, Wishes()).name == "fast"  # measured on CPUs


def test_a_jobs_conversation_rows_keep_the_fast_path(tiny_model_dir, tmp_path):
    from tunesmith.machine.path import fast_only

    recipe = validate_recipe({"name": "r", "output_dir": str(tmp_path), "model": {"name": str(tiny_model_dir)}})
    assert fast_only(recipe) is None
    assert "conversation rows" in fast_only(recipe, [{"messages": [{"role": "user", "content": "hi"}]}])
