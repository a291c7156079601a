"""Load a base model and tokenizer, pick device and precision, wrap with LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.errors import ModelError
from tunesmith.machine.placement import Placement
from tunesmith.models.names import resolve


def load_tokenizer(name: str):
    """Tokenizer with a pad token, padding side left (for generation)."""
    from transformers import AutoTokenizer

    ref = resolve(name)
    try:
        tok = AutoTokenizer.from_pretrained(ref)
    except OSError as exc:
        raise ModelError(_not_found_message(name, exc)) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(name: str, placement: Placement, attn_implementation: str | None = None) -> Any:
    """Load a causal LM from an embedded name, local folder or HF id, in eval mode; a ``random:`` name is
    built with random weights directly on the device. ``attn_implementation`` None keeps transformers' choice."""
    from transformers import AutoModelForCausalLM

    from tunesmith.models.random_weights import build, is_random

    if attn_implementation is None and placement.path is not None:
        attn_implementation = placement.path.attn_implementation
    ref = resolve(name)
    if is_random(ref) and not any(Path(ref).glob("*.safetensors")):
        return build(Path(ref), placement, attn_implementation)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=placement.torch_dtype, **extra)
    except OSError as exc:
        raise ModelError(_not_found_message(name, exc)) from exc
    model.to(placement.device)
    model.eval()
    return model


def sharing_weights(model) -> Any:
    """A second module tree of ``model`` holding the very same parameter and buffer tensors (no weight copied): what
    one process gives a second user of a resident base (the Tinker trainer beside the serving engine), so that each
    may wrap its own tree (peft injects its layers into the tree it is given) while one base sits in memory."""
    import copy

    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def load_trained(base: str, folder: Path, placement: Placement) -> Any:
    """A trained folder as a plain model: a PEFT adapter merged into ``base`` (base-model speed, plain
    weights), or a merged / fully fine-tuned model folder as it is."""
    if (Path(folder) / "adapter_config.json").is_file():
        from peft import PeftModel

        model = untied_for(load_model(base, placement), Path(folder))
        return PeftModel.from_pretrained(model, str(folder)).merge_and_unload().eval()
    return load_model(str(folder), placement)


def untied_for(model, adapter: Path):
    """``model`` with its output layer's weights its own when ``adapter`` adapts that layer and the base ties it to
    the input embeddings: merged, the adapter's change stays on the output (tied, it would change the embeddings
    too), and the saved model says the two are no longer tied."""
    import json

    import torch

    head = model.get_output_embeddings()
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    targets = config.get("target_modules") or []
    name = next((n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head), None)
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    if tied and name is not None and (name in targets if isinstance(targets, list) else False):
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    return model


def _not_found_message(name: str, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"Could not load model '{name}': {first}. Use an embedded name (see `tunesmith models list`), "
        "a local folder with config.json, or a Hugging Face id that is cached locally."
    )


def check_adapter_device(adapter: str, placement: Placement) -> None:
    """QLoRA quantizes the base model to 4 bits with bitsandbytes, which needs a CUDA GPU."""
    from tunesmith.errors import ConfigError

    if adapter != "qlora":
        return
    if placement.device != "cuda":
        raise ConfigError(
            "train.adapter: qlora needs a CUDA GPU (bitsandbytes 4-bit kernels); this machine has none. "
            "Use train.adapter: lora (the base model stays in fp32 on a CPU) or run on a CUDA machine."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ConfigError("train.adapter: qlora needs bitsandbytes: pip install bitsandbytes") from exc


HEAD_LAYERS = ["score", "classifier", "qa_outputs", "lm_head"]  # transformers' task heads: trained, never quantized


def four_bit(placement: Placement, keep: list[str] | None = None) -> dict:
    """QLoRA's ``from_pretrained`` keywords: the linear layers in NF4 with double-quantised scales, matmuls in the
    placement's dtype, every weight on the current CUDA device (a 4-bit model cannot be moved after loading).
    ``keep``: layers left unquantized (default: transformers' choice, the output layer; a task head must name its
    own, e.g. the span head's ``qa_outputs``, which transformers' rule — the last parameter — misses by its bias)."""
    import torch
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=placement.torch_dtype, llm_int8_skip_modules=keep)
    return {"quantization_config": quant, "device_map": {"": torch.cuda.current_device()}}


def quantized(placement: Placement) -> bool:
    """Whether the training path of ``placement`` loads the base model in 4 bits (QLoRA)."""
    return bool(placement.path is not None and placement.path.quantization)


def load_head_model(auto_class, ref: str, placement: Placement, tokenizer, **kwargs):
    """``auto_class`` (a transformers ``AutoModelFor…`` with a task head) on the base model folder ``ref``, padded
    as the tokenizer pads; on a QLoRA path its linear layers in 4 bits (the head layer not), loaded onto the GPU
    and left there, else moved to the placement's device."""
    four = four_bit(placement, HEAD_LAYERS) if quantized(placement) else {}
    model = auto_class.from_pretrained(ref, dtype=placement.torch_dtype, **kwargs, **four)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model if four else model.to(placement.device)


def load_model_for(name: str, placement: Placement, adapter: str = "lora", attn_implementation: str | None = None) -> Any:
    """Load the base model for an adapter: 4-bit NF4 for QLoRA (CUDA), else as :func:`load_model`."""
    check_adapter_device(adapter, placement)
    if adapter != "qlora":
        return load_model(name, placement, attn_implementation)
    from transformers import AutoModelForCausalLM

    from tunesmith.models.random_weights import is_random, save_weights

    if attn_implementation is None and placement.path is not None:
        attn_implementation = placement.path.attn_implementation
    ref = resolve(name)
    if is_random(ref):  # the 4-bit loader reads files: write the seeded random weights once
        save_weights(Path(ref))
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(ref, dtype=placement.torch_dtype, **four_bit(placement), **extra)
    for p in model.parameters():  # the adapter trains; every base weight stays as loaded
        p.requires_grad_(False)
    return model  # not PEFT's prepare_model_for_kbit_training: it copies the embeddings, output layer and norms
    # to fp32 (2.1 GB more at Llama-3.1-8B, each step's matmuls on them in fp32) for nothing bf16 lacks


def set_attention_dropout(model, p: float | None) -> int:
    """Set the dropout on attention probabilities of every attention layer of ``model`` to ``p`` (None: leave
    the model's own); returns how many layers changed. Encoders (BERT, XLM-R) keep it as an ``nn.Dropout``
    named ``dropout`` in their ``*Attention`` modules, decoders as a float ``attention_dropout``; the
    hidden-state dropout elsewhere is left as it is."""
    import torch

    if p is None:
        return 0
    changed = 0
    for module in model.modules():
        if not type(module).__name__.endswith("Attention"):
            continue
        if isinstance(getattr(module, "dropout", None), torch.nn.Dropout):
            changed += module.dropout.p != p
            module.dropout.p = p
        elif isinstance(getattr(module, "attention_dropout", None), float):
            changed += module.attention_dropout != p
            module.attention_dropout = p
    config = getattr(model, "config", None)  # saved with the model: what it was trained with
    for key in ("attention_probs_dropout_prob", "attention_dropout"):
        if config is not None and isinstance(getattr(config, key, None), float):
            setattr(config, key, p)
    return changed


def wrap_adapter(model, adapter: str, lora, seed: int, task_type: str = "CAUSAL_LM",
                 freeze_embeddings: bool = False):
    """LoRA / DoRA / QLoRA adapters (seeded), or every weight trainable for ``full`` (all but the
    input embeddings with ``freeze_embeddings``). ``task_type`` ``SEQ_CLS`` (classifier, regression) and
    ``QUESTION_ANS`` (span) make PEFT train the head layer fully beside the adapter."""
    if adapter == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        if freeze_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)
        return model
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, use_dora=adapter == "dora", task_type=task_type,
                        exclude_modules=["qa_outputs"] if task_type == "QUESTION_ANS" else None)  # trained fully
    return get_peft_model(model, config)
