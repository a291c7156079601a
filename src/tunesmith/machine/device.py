"""The training path chosen from the machine: precision, TF32, optimizer, attention kernel, packing
form, fused kernels, gradient checkpointing and 4-bit settings.

:func:`choose_path` is a pure function of the machine's capabilities (:class:`Capabilities`, read by
:func:`probe`) and the recipe's wishes, so every branch is tested without a GPU. On a CPU it
chooses what tunesmith has always done there: fp32 (bf16 matmuls on CPUs without bf16 units run
~500x slower), no TF32, plain AdamW, transformers' default attention with the collator's explicit
4D block mask for packing, no fused kernels, no gradient checkpointing (~1.7x slower backward; the
micro-batch is halved instead when memory is short). On a CUDA GPU it chooses bf16 base weights
(full fine-tuning: fp32 master weights under bf16 autocast), TF32 matmuls, fused AdamW,
FlashAttention-2 where installed, else flex attention for models whose attention soft-caps its
logits (which SDPA ignores; eager where flex is unavailable), else SDPA; packed rows on tunesmith's
variable-length attention (:mod:`tunesmith.machine.varlen`: the collator hands the examples'
boundaries to PyTorch's ``varlen_attn``, FlashAttention's varlen kernel where installed, or SDPA
with a block mask built on the device from them; no host read), soft-capping models packed by
restarting position ids (flex builds its block mask from them), Liger's fused kernels where installed, gradient
checkpointing only when the memory estimate says the batch would not fit, and for QLoRA NF4 with
double quantisation, bf16 compute and paged 8-bit AdamW. On both, generative SFT scores its target
positions in vocabulary tiles without holding their logits (:mod:`tunesmith.train.chunked_loss`).
``train.path: auto`` takes tunesmith's fast path on CPUs (measured there) and on GPU kinds where
``scripts/gpu_run.sh verify`` recorded its losses equal to the reference path's
(:mod:`tunesmith.machine.verified`); on any other CUDA GPU it takes the reference path, unless the recipe needs
what only the fast path trains (conversation rows, mean pooling, a probe start). ``train.path: fast`` always takes
tunesmith's path; ``train.path: reference`` keeps the device choices but trains with plain TRL / transformers
(:mod:`tunesmith.train.reference`): TRL's padding-free batches only under FlashAttention (else unpacked, SDPA
rather than flex), the model's own loss, the path's reason naming it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tunesmith.errors import ConfigError
from tunesmith.machine.methods import MethodSpec, method_spec

ATTENTION = ("flash_attention_2", "sdpa", "flex_attention", "eager")
REFERENCE = "reference: plain TRL/transformers, none of tunesmith's trainers"


@dataclass(frozen=True)
class Capabilities:
    """What the machine offers (see :func:`probe`)."""

    cuda: bool = False
    bf16: bool = False  # the GPU runs bf16 matmuls natively
    compute_capability: tuple[int, int] | None = None
    flash_attn: bool = False  # the flash_attn package imports
    varlen_attn: bool = False  # torch.nn.attention.varlen (FlashAttention's varlen kernel in torch) on an Ampere+ GPU
    flex_attention: bool = False  # torch's flex attention and Triton to compile it
    liger: bool = False  # liger_kernel imports
    bitsandbytes: bool = False
    free_memory: int | None = None  # bytes free on the device
    device_name: str = "cpu"
    fast_path_verified: bool = False  # the check (tunesmith.train.verify) wrote this GPU kind's record, verified
    fast_path_finding: str | None = None  # what a record that does not verify it found there


@dataclass(frozen=True)
class Wishes:
    """What the recipe asks for (``auto`` leaves the choice to :func:`choose_path`)."""

    precision: str = "auto"  # model.precision: auto | fp32 | bf16 | fp16
    device: str = "auto"  # model.device: auto | cpu | cuda | mps
    adapter: str = "lora"  # lora | dora | qlora | full
    head: str = "generative"  # generative, or a head kind (classifier | regression | span)
    method: str = "sft"  # a registered training method (tunesmith.machine.methods)
    packing: bool = True
    optimizer: str = "auto"
    attention: str = "auto"
    kernels: str = "auto"  # auto | liger | none
    loss: str = "auto"  # auto | chunked | logits (generative SFT)
    gradient_checkpointing: bool | str = "auto"
    softcapping: bool = False  # the model soft-caps attention logits (Gemma-2)
    path: str = "auto"  # train.path: auto | fast (tunesmith's trainers) | reference (plain TRL / transformers)
    fast_only: str | None = None  # why only the fast path can train this recipe's data, if so

    @property
    def spec(self) -> MethodSpec:
        """The training method's shape (registered by its module)."""
        return method_spec(self.method)


@dataclass(frozen=True)
class TrainPath:
    """The chosen path, with one reason per choice (stated in summary.json and the report)."""

    device: str
    dtype: str  # float32 | bfloat16 | float16
    tf32: bool
    optimizer: str
    attention: str  # flash_attention_2 | sdpa | flex_attention | eager | default (transformers' own choice)
    packing: str  # block_mask | varlen | position_ids | off
    kernels: str  # liger | none
    gradient_checkpointing: bool
    quantization: dict | None = None  # 4-bit settings for QLoRA
    reasons: dict[str, str] = field(default_factory=dict)
    autocast: str | None = None  # bfloat16: fp32 weights, matmuls autocast to bf16 (full fine-tuning on a GPU)
    loss: str = "logits"  # chunked (target positions scored in vocabulary tiles) | logits | head
    name: str = "fast"  # fast (tunesmith's trainers) | reference (plain TRL / transformers)
    varlen: str | None = None  # packing varlen: the kernel tried first (torch | flash_attn | sdpa, machine/varlen.py)

    @property
    def attn_implementation(self) -> str | None:
        """What to pass to ``from_pretrained`` (None: transformers' default)."""
        return None if self.attention == "default" else self.attention

    @property
    def attention_kernel(self) -> str:
        """The kernel packed rows run on, as the memory estimate counts it: ``varlen`` for the variable-length
        kernels (no mask), else :attr:`attention`."""
        return "varlen" if self.packing == "varlen" and self.varlen in ("torch", "flash_attn") else self.attention

    @property
    def mask_in_collator(self) -> bool:
        """Whether the collator builds the 4D block mask (else the model builds it from position ids)."""
        return self.packing == "block_mask"

    def describe(self) -> str:
        dtype = self.dtype + (f" (autocast {self.autocast})" if self.autocast else "")
        packing = self.packing + (f" ({self.varlen})" if self.varlen else "")
        parts = [f"{self.device} {dtype}", f"attention {self.attention}", f"packing {packing}",
                 f"optimizer {self.optimizer}", f"kernels {self.kernels}", f"loss {self.loss}",
                 "gradient checkpointing" if self.gradient_checkpointing else "no gradient checkpointing"]
        if self.tf32:
            parts.append("TF32")
        if self.quantization:
            parts.append("4-bit " + self.quantization["quant_type"])
        head = f"{self.reasons.get('path', REFERENCE)} · " if self.name == "reference" else ""
        return head + ", ".join(parts)

    def to_json(self) -> dict:
        return asdict(self)


def precision_dtype(precision: str, device: str, bf16: bool) -> str:
    """``auto``: bf16 on a CUDA GPU that supports it, else fp32 (fp16 only when asked)."""
    if precision == "auto":
        precision = "bf16" if device == "cuda" and bf16 else "fp32"
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]


def choose_path(caps: Capabilities, wish: Wishes, fits_without_checkpointing: bool | None = None) -> TrainPath:
    """The training path for ``wish`` on a machine with ``caps``.

    ``fits_without_checkpointing`` is the memory estimator's verdict for the batch as configured
    (None when it could not estimate). Raises :class:`ConfigError` when the recipe asks for something
    this machine cannot do, naming the setting.
    """
    device = wish.device if wish.device != "auto" else ("cuda" if caps.cuda else "cpu")
    gpu = device == "cuda"
    why: dict[str, str] = {}
    dtype = precision_dtype(wish.precision, device, caps.bf16)
    why["dtype"] = ("asked" if wish.precision != "auto" else
                    "bf16 weights on a GPU with bf16 units" if dtype == "bfloat16" else
                    "fp32: bf16 matmuls on a CPU without bf16 units are ~500x slower" if not gpu else
                    "fp32: this GPU has no bf16")
    autocast = None
    if gpu and wish.adapter == "full" and dtype == "bfloat16" and wish.precision == "auto":
        dtype, autocast = "float32", "bfloat16"
        why["dtype"] = ("full fine-tuning: fp32 master weights (updates smaller than bf16's resolution are not "
                        "lost), matmuls in bf16 autocast")
    quant = None
    if wish.adapter == "qlora":
        if not gpu:
            raise ConfigError("train.adapter: qlora needs a CUDA GPU (bitsandbytes 4-bit kernels); this machine has "
                              "none. Use train.adapter: lora (the base model stays in fp32 on a CPU).")
        if not caps.bitsandbytes:
            raise ConfigError("train.adapter: qlora needs bitsandbytes: pip install bitsandbytes")
        quant = {"quant_type": "nf4", "double_quant": True, "compute_dtype": dtype}
        why["quantization"] = "QLoRA: NF4 weights with double-quantised scales, matmuls in the compute dtype"
    cc = caps.compute_capability or (0, 0)
    tf32 = gpu and cc >= (8, 0) and dtype != "float16"
    why["tf32"] = "Ampere or newer: fp32 matmuls (optimizer, fp32 parts) in TF32" if tf32 else "not a GPU with TF32"
    optimizer, why["optimizer"] = _optimizer(wish, gpu)
    attention, why["attention"] = _attention(caps, wish, gpu, cc)
    packing, why["packing"] = _packing(wish, gpu, attention)
    varlen = None
    if packing == "varlen":
        varlen = _varlen_kernel(caps, wish, attention, autocast or dtype)
        why["packing"] += VARLEN_KERNELS[varlen]
    kernels, why["kernels"] = _kernels(caps, wish, gpu)
    checkpointing, why["gradient_checkpointing"] = _checkpointing(wish, gpu, fits_without_checkpointing)
    loss, why["loss"] = loss_form(wish)
    name, path_why = _path_name(caps, wish, gpu)
    if path_why:
        why["path"] = path_why
    if name == "reference":
        if gpu and attention == "sdpa" and wish.attention == "auto":
            why["attention"] = "reference: PyTorch's SDPA, transformers' default (flash-attn is not installed)"
        packing, why["packing"] = _reference_packing(wish, attention)
        loss, why["loss"] = _reference_loss(wish, kernels)
        varlen = None
    return TrainPath(device, dtype, tf32, optimizer, attention, packing, kernels, checkpointing, quant, why, autocast,
                     loss, name, varlen)


def _path_name(caps: Capabilities, wish: Wishes, gpu: bool) -> tuple[str, str | None]:
    """fast or reference, and why when it is not what the recipe named."""
    if wish.path == "reference":
        return "reference", REFERENCE
    if wish.path == "fast" or not gpu or caps.fast_path_verified:
        return "fast", None
    unverified = (f"tunesmith's fast path is not verified on {caps.device_name} ({caps.fast_path_finding})"
                  if caps.fast_path_finding else
                  f"tunesmith's fast path has no recorded verification on {caps.device_name} "
                  "(scripts/gpu_run.sh verify)")
    if wish.fast_only:
        return "fast", f"auto: {unverified}, but {wish.fast_only}"
    return "reference", (f"{REFERENCE} · auto: {unverified}; train.path: fast takes it (packing, fused kernels, "
                         "chunked loss)")


def _reference_packing(wish: Wishes, attention: str) -> tuple[str, str]:
    """TRL's own packing on the reference path: padding-free (sequences flattened into one row, position ids
    restarting) where FlashAttention runs it, the only attention TRL supports it with; else padded batches."""
    if wish.head != "generative":
        return "off", f"reference: transformers' {wish.head} head reads one padded example per row"
    if not wish.packing:
        return "off", "train.packing: false"
    if attention == "flash_attention_2":
        return "position_ids", "reference: TRL's padding-free batches (FlashAttention reads the sequence boundaries)"
    return "off", ("reference: TRL packs padding-free only under FlashAttention (not on this machine): padded "
                   "batches, one example per row")


def _reference_loss(wish: Wishes, kernels: str) -> tuple[str, str]:
    """The reference path's loss: the model's (or Liger's fused) cross-entropy as TRL and transformers compute it."""
    if wish.head != "generative":
        return "head", f"reference: transformers' {wish.head} head and its own loss"
    if kernels == "liger":
        return "logits", "reference: TRL's loss through Liger's fused linear cross-entropy (use_liger_kernel)"
    return "logits", "reference: TRL's own loss on the model's logits"


def _optimizer(wish: Wishes, gpu: bool) -> tuple[str, str]:
    if wish.optimizer != "auto":
        return wish.optimizer, "asked"
    if gpu and wish.adapter == "qlora":
        return "paged_adamw_8bit", "QLoRA: 8-bit AdamW states, paged to the host when GPU memory runs short"
    if gpu:
        return "adamw_torch_fused", "fused AdamW: one kernel per parameter group instead of one per tensor"
    return "adamw_torch", "plain AdamW on a CPU"


def _attention(caps: Capabilities, wish: Wishes, gpu: bool, cc: tuple[int, int]) -> tuple[str, str]:
    if wish.attention != "auto":
        if wish.attention == "flash_attention_2" and not (gpu and caps.flash_attn):
            raise ConfigError("train.attention: flash_attention_2 needs a CUDA GPU and the flash-attn package "
                              "(pip install flash-attn); use train.attention: auto")
        if wish.attention == "flex_attention" and not gpu:
            raise ConfigError("train.attention: flex_attention cannot train on a CPU (PyTorch runs flex attention's "
                              "backward pass only on GPUs); use train.attention: auto")
        if wish.attention == "flex_attention" and not caps.flex_attention:
            raise ConfigError("train.attention: flex_attention needs torch's flex attention and Triton on this GPU; "
                              "use train.attention: auto")
        return wish.attention, "asked"
    if not gpu:
        return "default", "transformers' default attention (sdpa for most models) with the collator's block mask"
    if caps.flash_attn and cc >= (8, 0):
        return "flash_attention_2", "FlashAttention-2 is installed: variable-length kernels, no mask at all"
    if wish.softcapping:
        if caps.flex_attention:
            return "flex_attention", "the model soft-caps attention logits, which SDPA ignores; flex applies it"
        return "eager", "the model soft-caps attention logits, which SDPA ignores, and flex attention is unavailable"
    if _packing(wish, gpu, "sdpa")[0] != "off":  # flex attention measured 4x slower here (below): only when asked
        return "sdpa", ("flash-attn is not installed: the model loads with PyTorch's SDPA and its packed rows run on "
                        "tunesmith's variable-length attention (flex attention's sparse block mask trained "
                        "Llama-3.2-1B 4x slower on an H200: it recompiles; train.attention: flex_attention asks for it)")
    return "sdpa", "flash-attn is not installed: PyTorch's SDPA (flash kernel unpacked, memory-efficient kernel with a mask)"


def _packing(wish: Wishes, gpu: bool, attention: str) -> tuple[str, str]:
    if wish.head != "generative":
        return "off", f"a {wish.head} head reads one example per row: never packed"
    if not wish.spec.packs:
        return "off", wish.spec.unpacked_reason
    if not wish.packing:
        return "off", "train.packing: false"
    if gpu and attention in ("sdpa", "flash_attention_2"):
        return "varlen", ("packed: the collator computes each example's boundaries (cu_seqlens, the longest) on the "
                          "host and the model's attention reads them, so transformers checks no position ids (a "
                          "host sync per step) and builds no mask; ")
    if gpu:
        how = {"flex_attention": "transformers builds a sparse block mask from them"}.get(
            attention, "transformers builds the block mask on the GPU from them")
        return "position_ids", f"packed by restarting position ids; {how}"
    return "block_mask", "packed with an explicit 4D block-diagonal mask built by the collator"


VARLEN_KERNELS = {
    "torch": "PyTorch's varlen_attn (FlashAttention's variable-length kernel inside torch), each micro-batch one row "
             "without padding",
    "flash_attn": "FlashAttention's flash_attn_varlen_func, each micro-batch one row without padding",
    "sdpa": "SDPA with the block-diagonal mask built on the GPU from the boundaries (rows of the longest example)",
}


def _varlen_kernel(caps: Capabilities, wish: Wishes, attention: str, compute_dtype: str) -> str:
    """The variable-length kernel packed rows try first: FlashAttention's where the model loads with it, SDPA's
    masked kernel where SDPA was asked, else PyTorch's own varlen_attn where this torch and GPU have it and the
    matmuls run in bf16/fp16 (its only dtypes), else SDPA's."""
    if attention == "flash_attention_2":
        return "flash_attn"
    if wish.attention == "sdpa" or compute_dtype == "float32":
        return "sdpa"
    return "torch" if caps.varlen_attn else "sdpa"


def _kernels(caps: Capabilities, wish: Wishes, gpu: bool) -> tuple[str, str]:
    if wish.kernels == "none":
        return "none", "asked"
    if wish.kernels == "liger":
        if not gpu:
            raise ConfigError("train.kernels: liger needs a CUDA GPU (Liger's kernels are Triton); "
                              "use train.kernels: auto or none on this machine")
        if not caps.liger:
            raise ConfigError("train.kernels: liger needs liger-kernel: pip install liger-kernel "
                              "(or set train.kernels: auto)")
        return "liger", "asked"
    if gpu and caps.liger:
        return "liger", "Liger's fused RMSNorm, RoPE and SwiGLU kernels are installed"
    return "none", "no CUDA GPU" if not gpu else "liger-kernel is not installed"


def loss_form(wish) -> tuple[str, str]:
    """How training scores its outputs, and why: ``wish`` is :class:`Wishes` or a recipe's train section (the memory
    estimator asks with the latter), read for ``head``, ``spec`` (the method's shape) and ``loss``."""
    if wish.head != "generative":
        return "head", f"the {wish.head} head's own loss over its labels"
    if wish.spec.loss is not None:
        return wish.spec.loss
    if wish.loss != "auto":
        return wish.loss, "asked"
    return "chunked", ("target positions picked by integer index and scored in vocabulary tiles: no logits held, no "
                       "host read on a GPU (TRL's Triton kernel there), as fast as the logits loss on a CPU")


def _checkpointing(wish: Wishes, gpu: bool, fits: bool | None) -> tuple[bool, str]:
    if wish.gradient_checkpointing != "auto":
        return bool(wish.gradient_checkpointing), "asked"
    if not gpu:
        return False, "off on a CPU (the micro-batch is halved instead when memory is short)"
    if fits is False:
        return True, "the memory estimate says the batch would not fit without it"
    return False, "the batch fits without it" if fits else "no memory estimate; off"


def probe(device: str = "auto") -> Capabilities:
    """Read the machine's capabilities (imports checked with find_spec: nothing heavy is imported)."""
    import importlib.util

    import torch

    def has(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            return False

    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if not cuda:
        return Capabilities(flash_attn=False, liger=False, bitsandbytes=has("bitsandbytes"))
    from tunesmith.machine.verified import verification

    free, _ = torch.cuda.mem_get_info()
    name = torch.cuda.get_device_name()
    verified, finding = verification(name)
    return Capabilities(
        cuda=True, bf16=torch.cuda.is_bf16_supported(), compute_capability=torch.cuda.get_device_capability(),
        flash_attn=has("flash_attn"), flex_attention=has("triton") and has("torch.nn.attention.flex_attention"),
        varlen_attn=has("torch.nn.attention.varlen") and torch.cuda.get_device_capability() >= (8, 0),
        liger=has("liger_kernel"), bitsandbytes=has("bitsandbytes"), free_memory=free,
        device_name=name, fast_path_verified=verified, fast_path_finding=finding,
    )


GPU_TILE = 32768  # vocabulary columns per projection tile on a GPU (TRL's own choice for its fused head)
CPU_TILE = 2048  # on a CPU: the torch fold's temporaries stay small and in cache


def tile_width(device) -> int:
    """Vocabulary columns per tile on ``device`` (a torch device or its type)."""
    return CPU_TILE if getattr(device, "type", device) == "cpu" else GPU_TILE
