"""Architecture-faithful models with random weights: ``model.name: random:<arch>[?key=value&...]``.

Speed and memory depend on the architecture (layers, widths, heads, vocabulary), not on the
weights, so a real architecture with random weights measures a 1-8B fine-tune without fetching
anything. The architecture facts (each model's published ``config.json``, no weights) ship with
the package under ``models/architectures/``. Query keys scale a copy down for tests
(``random:qwen2.5-7b?layers=2&hidden=64&vocab=600``) or pick the tokenizer and the seed.

The tokenizer comes from ``tokenizer=`` (a model folder, an embedded name, or a model registered
with ``models add``), by default the embedded SmolLM2 tokenizer (49,152 tokens; its ids fit every
shipped vocabulary). A random model is marked as such in its folder; evaluation and serving refuse
it unless asked explicitly, and reports made from one say so first.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qsl

from tunesmith.errors import ModelError

PREFIX = "random:"
MARKER = "tunesmith-random.json"
DEFAULT_TOKENIZER = "smollm2-135m-instruct"
_INT_KEYS = ("layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab", "seed")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "vocab.json", "merges.txt", "tokenizer.model")


@dataclass(frozen=True)
class RandomSpec:
    """A parsed ``random:`` name: the architecture, its scaled-down sizes, tokenizer and seed."""

    arch: str
    sizes: tuple[tuple[str, int], ...] = ()  # (key, value) of layers/hidden/intermediate/heads/kv_heads/head_dim/vocab
    tokenizer: str = DEFAULT_TOKENIZER
    seed: int = 0

    @property
    def slug(self) -> str:
        """A folder name that differs for every distinct spec."""
        parts = [self.arch] + [f"{k}{v}" for k, v in self.sizes] + [f"seed{self.seed}"]
        tok = Path(self.tokenizer).name.replace(".", "_") if self.tokenizer != DEFAULT_TOKENIZER else ""
        if tok:
            import hashlib

            parts.append(f"tok-{tok}-{hashlib.sha256(self.tokenizer.encode()).hexdigest()[:8]}")
        return "-".join(parts)


def is_random(name: str) -> bool:
    return str(name).startswith(PREFIX) or (Path(str(name)) / MARKER).is_file()


def architectures() -> list[str]:
    """The shipped architecture names (``llama-3.2-1b``, ...)."""
    folder = resources.files("tunesmith.models") / "architectures"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def parse(name: str) -> RandomSpec:
    """``random:<arch>?layers=2&hidden=64&vocab=600&tokenizer=PATH&seed=0`` → :class:`RandomSpec`."""
    if not name.startswith(PREFIX):
        raise ModelError(f"'{name}' is not a random model name (random:<arch>)")
    arch, _, query = name[len(PREFIX):].partition("?")
    if arch not in architectures():
        raise ModelError(f"model.name {name}: unknown architecture '{arch}'. Known: {', '.join(architectures())}")
    sizes, tokenizer, seed = [], DEFAULT_TOKENIZER, 0
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == "tokenizer":
            tokenizer = value
        elif key in _INT_KEYS:
            if not value.isdigit() or int(value) < 1 and key != "seed":
                raise ModelError(f"model.name {name}: {key}={value!r} must be a positive whole number")
            if key == "seed":
                seed = int(value)
            else:
                sizes.append((key, int(value)))
        else:
            raise ModelError(f"model.name {name}: unknown key '{key}'; known: {', '.join(_INT_KEYS)}, tokenizer")
    return RandomSpec(arch, tuple(sorted(sizes)), tokenizer, seed)


def base_config(arch: str) -> dict:
    """The shipped ``config.json`` facts of ``arch`` (without our ``_source`` note)."""
    path = resources.files("tunesmith.models") / "architectures" / f"{arch}.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc.pop("_source", None)
    return doc


def scaled_config(spec: RandomSpec) -> dict:
    """The architecture's config with the spec's sizes applied.

    Changing ``hidden`` alone keeps the architecture's shape: the MLP width scales by the same
    ratio, heads become ``hidden // head_dim`` (head_dim at most ``hidden // 4``) and key/value
    heads keep the architecture's grouping (query heads per key/value head).
    """
    cfg = base_config(spec.arch)
    sizes = dict(spec.sizes)
    old_hidden, old_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    old_head_dim = cfg.get("head_dim") or old_hidden // old_heads
    group = old_heads // cfg.get("num_key_value_heads", old_heads)
    if "layers" in sizes:
        cfg["num_hidden_layers"] = sizes["layers"]
        if "max_window_layers" in cfg:
            cfg["max_window_layers"] = sizes["layers"]
    if "vocab" in sizes:
        cfg["vocab_size"] = sizes["vocab"]
    if "hidden" in sizes:
        hidden = sizes["hidden"]
        head_dim = sizes.get("head_dim", min(old_head_dim, max(hidden // 4, 1)))
        heads = sizes.get("heads", max(hidden // head_dim, 1))
        mlp = max(8, round(cfg["intermediate_size"] * hidden / old_hidden / 8) * 8)
        cfg.update(hidden_size=hidden, head_dim=head_dim, num_attention_heads=heads,
                   intermediate_size=sizes.get("intermediate", mlp),
                   num_key_value_heads=sizes.get("kv_heads", max(1, heads // group)))
        if "query_pre_attn_scalar" in cfg:
            cfg["query_pre_attn_scalar"] = head_dim
    for key, field in (("intermediate", "intermediate_size"), ("heads", "num_attention_heads"),
                       ("kv_heads", "num_key_value_heads"), ("head_dim", "head_dim")):
        if key in sizes:
            cfg[field] = sizes[key]
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise ModelError(f"random:{spec.arch}: {cfg['num_attention_heads']} heads do not divide into "
                         f"{cfg['num_key_value_heads']} key/value heads; set heads= and kv_heads=")
    return cfg


def folder_for(name: str) -> Path:
    """The cache folder of a ``random:`` name (config.json, tokenizer files, marker; no weights),
    written on first use. ``from_pretrained`` of its tokenizer and the memory estimator read it."""
    from tunesmith.paths import models_dir

    spec = parse(name)
    folder = models_dir() / "random" / spec.slug
    if (folder / MARKER).is_file():
        return folder
    import tempfile

    tok_folder = _tokenizer_folder(spec.tokenizer)
    cfg = scaled_config(spec)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.slug}-", dir=folder.parent))  # one per process: ranks may race
    for f in _TOKENIZER_FILES:
        if (tok_folder / f).is_file():
            shutil.copy2(tok_folder / f, staging / f)
    vocab = _tokenizer_size(staging)
    if vocab > cfg["vocab_size"]:
        shutil.rmtree(staging)
        raise ModelError(f"model.name {name}: the tokenizer has {vocab} tokens but the vocabulary is "
                         f"{cfg['vocab_size']}; raise vocab= or pick a smaller tokenizer=")
    (staging / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    (staging / MARKER).write_text(json.dumps({"name": name, "arch": spec.arch, "seed": spec.seed,
                                              "tokenizer": spec.tokenizer}), encoding="utf-8")
    try:
        staging.rename(folder)
    except OSError:  # another process wrote the same folder first: the same content
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / MARKER).is_file():
            raise
    return folder


def _tokenizer_folder(ref: str) -> Path:
    from tunesmith.models.registry import local_folder

    path = Path(local_folder(ref))
    if not path.is_dir() or not (path / "tokenizer_config.json").is_file():
        raise ModelError(f"random model tokenizer '{ref}' is not a local folder with a tokenizer; "
                         f"give tokenizer=FOLDER or run: tunesmith models pull {DEFAULT_TOKENIZER}")
    return path


def _tokenizer_size(folder: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(folder)))


def build(folder: Path, placement, attn_implementation: str | None = None):
    """The model of a random folder with seeded random weights, created directly on the placement's device
    in its dtype (one allocation: an 8B model in bf16 takes 16 GB once, never a CPU copy first)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    doc = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    meta = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    config = AutoConfig.for_model(doc.pop("model_type"), **doc)
    config.name_or_path = str(folder)
    kwargs = {"dtype": placement.torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    torch.manual_seed(int(meta.get("seed", 0)))
    with torch.device(placement.device):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.config.tunesmith_random_weights = meta["name"]
    return model.eval()


def save_weights(folder: Path, dtype: str = "bfloat16") -> Path:
    """Write seeded random weights once into the folder as safetensors, for loaders that read files (the 4-bit
    QLoRA load, the heads); every later load of the folder reads these same weights. Built on a CUDA GPU where
    there is one (Llama-3.1-8B's 8B random numbers take seconds there, minutes on CPU cores), else on the CPU."""
    if any(folder.glob("*.safetensors")):
        return folder
    import torch

    from tunesmith.machine.placement import Placement

    model = build(folder, Placement(_build_device(folder, dtype), dtype))
    model.save_pretrained(str(folder), safe_serialization=True)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the loader that follows gets the memory back
    return folder


def _build_device(folder: Path, dtype: str) -> str:
    """``cuda`` where the model fits in what this process may still allocate there (``train.memory_limit_gb`` holds
    it to a fraction), else ``cpu``."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    from tunesmith.machine.estimate import BYTES, model_shape

    need = model_shape(folder).params * BYTES[dtype] * 1.2
    free, total = torch.cuda.mem_get_info()
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda: 1.0)()
    return "cuda" if need < min(free, fraction * total - torch.cuda.memory_reserved()) else "cpu"


def refuse_random(name: str, what: str, flag: str) -> None:
    """Raise unless asked explicitly: a random model's outputs mean nothing outside speed and memory."""
    if is_random(name):
        raise ModelError(f"{what}: '{name}' has random weights (built for speed and memory measurements); its "
                         f"answers mean nothing. Set {flag} to {what.split()[0]} it anyway.")


def report_line(name: str) -> str | None:
    """The first line of a report made from a random model, else None."""
    if not is_random(name):
        return None
    return f"**Random weights**: {name} is an architecture with random weights, not a trained model; " \
           "its numbers measure speed and memory only."
