"""Expected peak training memory from the model's config and the recipe, without loading the model.

Parameter counts and shapes come from the safetensors header (a few KB read) or, failing that,
from config.json. Activations are what autograd keeps per token and layer for a Llama-style
decoder (:func:`activation_floats`, measured with saved-tensor hooks) for the worst case: every
micro-batch full (``batch_size x max_seq_length`` tokens), plus backward's working memory; the
attention term is what the attention kernel keeps (on a CPU, SDPA keeps the mask, eager the
probabilities). Logits are counted only where a loss is taken (the chunked loss holds one tile of
them), and a head has none over the vocabulary. On a CPU the process's runtime (Python and the
libraries) is counted too: the resident peak includes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tunesmith.errors import ModelError
from tunesmith.machine.device import loss_form, tile_width

if TYPE_CHECKING:
    from tunesmith.config import Recipe

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MB = 2**20


@dataclass
class Shape:
    params: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_dim: int
    vocab: int
    linear_shapes: list[tuple[int, int]] = field(default_factory=list)  # (out, in) of each decoder linear


@dataclass
class MemoryEstimate:
    parts: dict[str, int]  # bytes
    available: int | None
    device: str
    tokens_per_micro_batch: int

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def training_overhead(self) -> int:
        """Everything except the base weights and the runtime (what training adds on top of a loaded model)."""
        return self.total - self.parts["weights"] - self.parts.get(RUNTIME, 0)

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.total <= self.available

    def render(self) -> str:
        lines = [
            f"Expected peak memory for training on {self.device} "
            f"(worst case: {self.tokens_per_micro_batch:,} tokens per micro-batch):"
        ]
        lines += [f"  {k:<22} {v / MB:>10,.0f} MB" for k, v in self.parts.items()]
        lines.append(f"  {'total':<22} {self.total / MB:>10,.0f} MB")
        if self.available is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {verdict} in {self.available / MB:,.0f} MB available")
            if not self.fits:
                lines.append(
                    "  lower train.batch_size or train.max_seq_length, or set train.gradient_checkpointing"
                )
        return "\n".join(lines)


def model_shape(folder: Path) -> Shape:
    """Architecture numbers from ``config.json`` and parameter shapes from the safetensors header."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelError(
            f"{folder}: no config.json; --estimate needs a local model folder or an embedded model"
        )
    cfg = json.loads(cfg_path.read_text())
    cfg = cfg.get("text_config", cfg)
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv_dim = cfg.get("num_key_value_heads", heads) * head_dim
    shapes = _safetensors_shapes(folder)
    if shapes:
        params = sum(_numel(s) for s in shapes.values())
        linear = [
            tuple(s) for n, s in shapes.items() if ".layers." in n and n.endswith(".weight") and len(s) == 2
        ]
    else:
        inter, vocab = cfg["intermediate_size"], cfg["vocab_size"]
        q_dim = heads * head_dim  # differs from hidden in some models (Gemma-2: 8 x 256 vs 2304)
        per_layer = [
            (q_dim, hidden),
            (kv_dim, hidden),
            (kv_dim, hidden),
            (hidden, q_dim),
            (inter, hidden),
            (inter, hidden),
            (hidden, inter),
        ]
        linear = per_layer * layers
        embed = vocab * hidden * (1 if cfg.get("tie_word_embeddings") else 2)
        params = embed + sum(a * b for a, b in linear) + (2 * layers + 1) * hidden
    return Shape(params, hidden, cfg["intermediate_size"], layers, heads, kv_dim, cfg["vocab_size"], linear)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _safetensors_shapes(folder: Path) -> dict[str, list[int]]:
    """Tensor shapes from the JSON headers of the folder's safetensors files (no tensor data is read)."""
    shapes = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


BACKWARD_WORKING = 0.25
RUNTIME = "Python and libraries"
RUNTIME_BYTES = 476 * MB  # resident after importing torch, transformers, peft, trl, datasets and tunesmith


def activation_floats(shape: Shape, t) -> float:
    """Values autograd keeps per token and decoder layer while training, by adapter. Measured with
    saved-tensor hooks on SmolLM2-135M (hidden 576, kv 192, intermediate 1,536; 384-token rows) and fitted
    to the widths: full fine-tuning keeps 13.6 h + 1.5 kv + 5.5 i (norm inputs and outputs, the
    projections' inputs, q and k before and after the rotary embedding, the MLP's intermediate tensors);
    LoRA keeps 11.6 h + 1.5 kv + 5.5 i + the adapters' rank-wide outputs, and LoRA dropout adds a dropped
    copy of every adapted input (10.0 h + 1.0 i at dropout 0.05). Within 1% of the measured values
    (``benchmarks/activation_memory.py``)."""
    h, kv, i = shape.hidden, shape.kv_dim, shape.intermediate
    if t.adapter == "full":
        return 14 * h + 1.5 * kv + 5.5 * i
    per = 12 * h + 1.5 * kv + 5.5 * i + 14 * t.lora.r
    if t.lora.dropout > 0:
        per += 10 * h + i
    return per


def estimate(
    shape: Shape, recipe: Recipe, dtype: str = "float32", device: str = "cpu", available: int | None = None,
    attention: str | None = None, loss: str | None = None,
) -> MemoryEstimate:
    """``attention``: the kernel the training path runs (default: the recipe's ``train.attention``); ``loss``: the
    path's loss form (default: what :mod:`tunesmith.machine.device` chooses for ``train.loss`` on ``device``)."""
    t = recipe.train
    attention_kind = attention or t.attention
    b = BYTES[dtype]
    rows = t.batch_size * t.spec.sequences_per_example  # DPO: a chosen and a rejected sequence per pair
    tokens = rows * t.max_seq_length
    if t.adapter == "full":
        # train.freeze_embeddings: the input embeddings (most of a multilingual encoder) get no gradient or state
        trainable = shape.params - (shape.vocab * shape.hidden if t.freeze_embeddings else 0)
        adapter = 0
    else:
        trainable = sum(t.lora.r * (o + i) for o, i in shape.linear_shapes)
        adapter = trainable * 4
        if t.adapter == "dora":
            trainable += sum(o for o, _ in shape.linear_shapes)
    weights = shape.params * b
    if t.adapter == "qlora":  # the decoder's linear layers in NF4 + double-quantised scales; embeddings, output layer
        quantized = sum(o * i for o, i in shape.linear_shapes)  # and norms stay in the compute dtype
        weights = quantized * 0.5625 + (shape.params - quantized) * b
    checkpointing = t.gradient_checkpointing is True  # "auto" is decided with this estimate, without it
    states = {
        "auto": 2 if t.adapter == "qlora" and device == "cuda" else 8,  # see tunesmith.machine.device
        "adamw_torch": 8,
        "adamw_torch_fused": 8,
        "adafactor": 4,
        "sgd": 0,
        "adamw_8bit": 2,
        "paged_adamw_8bit": 2,
    }[t.optimizer]
    per_token_layer = activation_floats(shape, t) * b
    if checkpointing:  # each layer's input kept; one layer's activations recomputed at a time
        activations = tokens * shape.layers * shape.hidden * b + tokens * per_token_layer
    else:
        activations = tokens * shape.layers * per_token_layer
    layers_kept = 1 if checkpointing else shape.layers
    if attention_kind == "eager":  # the (rows, heads, L, L) probabilities and their softmax output, every layer
        attention = rows * shape.heads * t.max_seq_length**2 * b * 2 * layers_kept
    elif device == "cuda" and attention_kind in ("flash_attention_2", "flex_attention", "varlen"):
        attention = 0  # no mask: variable-length kernels, or flex's block mask (one entry per 128x128 block)
    elif device == "cuda":  # SDPA's fused kernels keep no probabilities: one bool L x L mask at most
        attention = rows * t.max_seq_length**2
    else:  # SDPA's CPU kernels keep no probabilities, only the 4D mask, as floats, once per layer
        attention = rows * t.max_seq_length**2 * 4 * layers_kept
    if t.spec.logit_bytes_per_token is not None:  # DPO: TRL's fused LM head scores in tiles, no (rows, L, vocab) logits
        logits = tokens * t.spec.logit_bytes_per_token
    elif t.head == "generative":
        targets = tokens if t.train_on_inputs else tokens // 2  # at most; the prompt carries none by default
        if (loss or loss_form(t)[0]) == "chunked":  # see tunesmith.train.chunked_loss
            logits = chunked_loss_bytes(shape, targets, b, trains_head=t.adapter == "full", device=device)
        else:
            logits = targets * shape.vocab * 4 * 3  # fp32 logits, their log-softmax and its gradient
    else:  # a head's outputs: a few numbers per text (or two per token for spans), never the vocabulary
        logits = tokens * 2 * 4 * 3
    parts = {
        "weights": int(weights),
        "adapter": int(adapter),
        "gradients": int(trainable * 4),
        "optimizer state": int(trainable * states),
        "activations": int(activations),
        # backward's own tensors (activation gradients, temporaries) and the allocator's slack: on a CPU the
        # resident peak rose 1,257 MiB per 384-token row where autograd keeps 1,025 MiB (1.23x), rounded up
        "backward working": int(activations * BACKWARD_WORKING),
        "attention": int(attention),
        "logits": int(logits),
    }
    if t.adapter == "qlora":  # bitsandbytes dequantises a 4-bit weight to the compute dtype for each matmul, forward
        parts["dequantised weight"] = 2 * max(o * i for o, i in shape.linear_shapes) * b  # and backward: two at once
    if device == "cpu":
        parts[RUNTIME] = RUNTIME_BYTES
    return MemoryEstimate(parts, available, device, tokens)


CPU_TILES = 15  # fp32 tiles the CPU fold keeps at once (its temporaries), measured: tests/test_train_estimate.py


def chunked_loss_bytes(shape: Shape, targets: int, b: int, trains_head: bool, device: str = "cuda") -> int:
    """The chunked loss's peak (TRL's kernel, :mod:`tunesmith.train.chunked_loss`): on a GPU one (≤4,096 tokens x
    32,768 vocabulary) tile in the compute dtype, folded in place by Triton; on a CPU the torch fold's fp32
    temporaries of a 2,048-wide tile. Plus the targets' fp32 hidden-state gradient and statistics, and where the
    head trains an fp32 accumulator of its gradient."""

    width = min(tile_width(device), shape.vocab)
    tile = min(targets, 4096) * width * (b if device == "cuda" else 4 * CPU_TILES)
    return tile + targets * (shape.hidden + 8) * 4 + (shape.vocab * shape.hidden * 4 if trains_head else 0)


def available_memory(device: str) -> int | None:
    """Free memory of the device: MemAvailable on a CPU, free CUDA memory on a GPU."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    from tunesmith.machine.memory import meminfo

    return meminfo("MemAvailable")


def estimate_recipe(recipe: Recipe, path=None, free: int | None = None) -> MemoryEstimate:
    """The estimate for a recipe on this machine (reads only config.json and safetensors headers): on ``path``'s
    device, dtype, attention kernel and loss form (:class:`tunesmith.machine.device.TrainPath`) once the training
    path is chosen, else on the placement the recipe asks for; planned against ``free`` bytes (default: what the
    device has available now), or ``train.memory_limit_gb`` where that is smaller."""
    if path is None:
        from tunesmith.machine.placement import pick_placement

        placement = pick_placement(recipe.model.precision, recipe.model.device)
        device, dtype, attention, loss = placement.device, placement.dtype, None, None
    else:
        device, dtype, attention, loss = path.device, path.dtype, path.attention_kernel, path.loss
    folder = Path(recipe.model.folder)
    budget = memory_budget(available_memory(device) if free is None else free, recipe.train.memory_limit_gb, device)
    return estimate(model_shape(folder), recipe, dtype, device, budget, attention, loss)


def memory_budget(free: int | None, limit_gb: float | None, device: str) -> int | None:
    """What a training is planned against: the device's free memory, or ``train.memory_limit_gb`` on a GPU where
    that is smaller (a run sized for a smaller or shared GPU)."""
    if limit_gb is None or device != "cuda":
        return free
    limit = int(limit_gb * 2**30)
    return limit if free is None else min(free, limit)
