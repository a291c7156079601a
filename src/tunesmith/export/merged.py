"""Export a trained run: a merged Hugging Face folder, or the PEFT adapter alone. A bare adapter folder (a Tinker
API sampler checkpoint, ``<data>/tinker/<run>/sampler_weights/<name>``) exports the same way: its base is the one its
``adapter_config.json`` names.

The merged folder holds safetensors weights, the tokenizer with its chat template and a
generation config whose ``eos_token_id`` lists every token that ends an assistant turn, so that
transformers, vLLM and llama.cpp converters stop where the model was trained to stop.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from tunesmith.config import Recipe
from tunesmith.errors import ConfigError, DataError
from tunesmith.train.result import Artefact, trained_output


def is_adapter_folder(path: Path) -> bool:
    """A PEFT adapter folder on its own (no run around it)."""
    return (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.resolved.yaml").is_file()


def adapter_base(path: Path) -> str:
    """The base model an adapter folder was trained on (its ``base_model_name_or_path``)."""
    import json

    base = json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{path}/adapter_config.json names no base_model_name_or_path: export needs the base")
    return base


def export_name(run_dir: Path) -> tuple[str, str | None]:
    """(a name for the exported model, the system prompt it was trained with, if any)."""
    if is_adapter_folder(run_dir):
        return Path(run_dir).name, None
    recipe = load_run_recipe(run_dir)
    return recipe.name, recipe.data.system_prompt if recipe.data else None


def load_run_recipe(run_dir: Path) -> Recipe:
    path = Path(run_dir) / "config.resolved.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no config.resolved.yaml); pass runs/<name>")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw.pop("_versions", None)
    return Recipe.model_validate(raw)


def arm_dir(run_dir: Path, arm: str) -> Path:
    """``runs/<name>/arms/<arm>``; names the arms the run has when ``arm`` is not one of them."""
    folder = Path(run_dir) / "arms" / arm
    if not folder.is_dir():
        have = sorted(p.name for p in (Path(run_dir) / "arms").glob("*") if p.is_dir())
        raise DataError(f"{run_dir}: no arm {arm!r} (arms: {', '.join(have) or 'none'})")
    return folder


def trained_dir(run_dir: Path) -> Path:
    """The run's language-model output (adapter or full model) that export works from."""
    found = trained_output(Path(run_dir))
    if found is not None and found[1] is Artefact.MODEL:
        return found[0]
    if found is not None:
        raise DataError(f"{run_dir}: its arm trained a {found[1]} head, which has no adapter or GGUF form "
                        "(llama.cpp runs generative models): export it with --merged")
    raise DataError(f"{run_dir}: no train/adapter (adapter) or train/model (merged model); run `tunesmith train` first")


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus the token the chat template closes an assistant turn with (often the same)."""
    from tunesmith.data.formats.messages import end_of_turn

    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    closing = end_of_turn(tokenizer).strip()
    if closing:
        tid = tokenizer.convert_tokens_to_ids(closing)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids


def merged_model(run_dir: Path):
    """``(model, tokenizer)``: base + adapter merged into plain fp32 weights (or the full fine-tune),
    with a generation config that stops at every end-of-turn token."""
    from transformers import AutoTokenizer, GenerationConfig

    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.loading import load_trained

    if is_adapter_folder(run_dir):
        from tunesmith.models.names import resolve

        base, src = adapter_base(run_dir), Path(run_dir)
        tokenizer = AutoTokenizer.from_pretrained(src if (src / "tokenizer_config.json").is_file() else resolve(base))
    else:
        base, src = load_run_recipe(run_dir).model.name, trained_dir(run_dir)
        tokenizer = AutoTokenizer.from_pretrained(src)
    model = load_trained(base, src, pick_placement("fp32", "cpu"))
    stops = stop_token_ids(tokenizer)
    gen = GenerationConfig.from_model_config(model.config)
    gen.eos_token_id = stops if len(stops) > 1 else stops[0]
    gen.pad_token_id = tokenizer.pad_token_id
    model.generation_config = gen
    model.config.eos_token_id = gen.eos_token_id
    return model, tokenizer


def export_merged(run_dir: Path, out: Path) -> Path:
    """Base model + adapter merged into plain weights (or the full fine-tune), saved as a HF folder; a head
    (classifier, regression, span) as its ``*ForSequenceClassification`` / ``*ForQuestionAnswering`` folder."""
    found = None if is_adapter_folder(run_dir) else trained_output(Path(run_dir))
    if found is not None and found[1] is not Artefact.MODEL:
        from tunesmith.export.heads import export_head

        return export_head(found[0], Path(out))  # its head.json names the base model
    model, tokenizer = merged_model(run_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def export_adapter(run_dir: Path, out: Path) -> Path:
    """The PEFT adapter (with the tokenizer it was trained with) copied to ``out``."""
    if is_adapter_folder(run_dir):
        shutil.copytree(run_dir, out, dirs_exist_ok=True)
        return Path(out)
    src = trained_dir(run_dir)
    if src.name != "adapter":
        raise ConfigError(f"{run_dir} is a full fine-tune: there is no adapter; use --merged")
    shutil.copytree(src, out, dirs_exist_ok=True)
    return Path(out)
