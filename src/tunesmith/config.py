"""The recipe schema: one pydantic model per section, validated once at the boundary.

Precedence: defaults < recipe YAML < ``--set a.b=c`` overrides. Every validation error is
reported at once with its field path, and an unknown key comes with the closest valid one.
"""

from __future__ import annotations

import difflib
import re
import string
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunesmith.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSection(Section):
    name: str = Field("smollm2-135m-instruct", description="embedded model name, local folder or HF id")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"


class SplitSection(Section):
    """Fractions (summing to at most 1) or absolute counts for train/val/test."""

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    stratify: bool = True

    @model_validator(mode="after")
    def _fractions_or_counts(self) -> SplitSection:
        parts = (self.train, self.val, self.test)
        if any(p < 0 for p in parts):
            raise ValueError("split sizes must be >= 0")
        if all(p <= 1 for p in parts):
            if sum(parts) > 1 + 1e-9:
                raise ValueError(f"split fractions sum to {sum(parts):.3f}; they must sum to at most 1")
        elif not all(float(p).is_integer() for p in parts):
            raise ValueError("give all split sizes as fractions (<= 1) or all as whole counts")
        if self.train == 0:
            raise ValueError("the train split is empty")
        return self


class DataSection(Section):
    path: Path
    format: Literal["auto", "jsonl", "csv", "json"] = "auto"
    task: Literal["classification", "generation"] = "classification"
    input_fields: list[str] = Field(..., min_length=1)
    target_field: str
    prompt: str = Field("{text}", description="template over the input fields, e.g. 'Review: {text}'")
    system_prompt: str | None = Field(
        "", description="system message; '' sends an empty one, null keeps the model's default"
    )
    labels: list[str] | None = Field(None, description="closed label set; default: the labels seen in the data")
    on_error: Literal["fail", "skip"] = "fail"
    limit: int | None = Field(None, ge=1, description="read at most this many records")
    split: SplitSection = SplitSection()

    @model_validator(mode="after")
    def _prompt_uses_known_fields(self) -> DataSection:
        names = {f for _, f, _, _ in string.Formatter().parse(self.prompt) if f}
        unknown = sorted(names - set(self.input_fields))
        if unknown:
            raise ValueError(
                f"prompt uses {unknown} which are not in input_fields {self.input_fields}; "
                "add them to input_fields or fix the template"
            )
        return self


class LoraSection(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class TrainSection(Section):
    method: Literal["lora", "full"] = "lora"
    lora: LoraSection = LoraSection()
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="overrides epochs when set")
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_seq_length: int = Field(512, ge=8)
    gradient_checkpointing: bool = False
    group_by_length: bool = True
    logging_steps: int = Field(5, ge=1)
    eval_steps: int | None = Field(None, ge=1, description="validation loss every N steps; default once per epoch")


class BandsSection(Section):
    """Regression hit bands: green under either bound, orange under either of its bounds, else red."""

    green_abs: float = Field(40.0, ge=0)
    green_rel: float = Field(0.2, ge=0)
    orange_abs: float = Field(80.0, ge=0)
    orange_rel: float = Field(0.4, ge=0)


class ContenderSpec(Section):
    name: str
    path: Path = Field(..., description="a PEFT adapter folder (with adapter_config.json) or a merged model")


class EndpointSpec(Section):
    name: str
    base_url: str = Field(..., description="e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    model: str
    api_key_env: str | None = Field("OPENAI_API_KEY", description="environment variable holding the key")
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(4, ge=0)
    backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles each retry")
    concurrency: int = Field(4, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="default: eval.max_new_tokens")


class JudgeSpec(Section):
    """LLM-as-judge over an endpoint: pairwise (both orders) between two contenders, or a 1-10 rubric."""

    endpoint: EndpointSpec
    mode: Literal["pairwise", "rubric"] = "pairwise"
    pair: list[str] = Field(["finetuned", "base"], min_length=2, max_length=2)
    rubric: str = "Score how correct, relevant and concise the answer is."


class EvalSection(Section):
    max_examples: int | None = Field(None, ge=1, description="evaluate at most this many test examples")
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(16, ge=1)
    label_scoring: bool = Field(True, description="score closed labels by log-likelihood (fair to the base model)")
    base_prompt_with_labels: bool = Field(
        True, description="list the labels in the base model's prompt so it can answer with one"
    )
    baselines: list[Literal["majority", "tfidf_logreg", "random", "mean", "ridge"]] = [
        "majority", "tfidf_logreg"
    ]
    # --- evaluation tasks, contenders and report (tunesmith eval) ---
    task: Literal["auto", "classification", "regression", "qa", "generation"] = Field(
        "auto", description="auto: follow data.task"
    )
    qa_lang: Literal["en", "ko"] = Field("en", description="en: SQuAD v1.1 scoring; ko: KorQuAD v1.0")
    bands: BandsSection = BandsSection()
    log_axes: bool = Field(False, description="log axes on the regression scatter plot")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for 95% CIs (0 turns them off)")
    adapters: list[ContenderSpec] = Field([], description="fine-tuned adapter or merged-model folders")
    endpoints: list[EndpointSpec] = Field([], description="OpenAI-compatible endpoints to compare")
    judge: JudgeSpec | None = None
    perplexity: bool = Field(True, description="mean loss / perplexity of the gold answers per local model")
    stop: list[str] = Field([], description="stop strings for free generation, e.g. ['\\n'] for short answers")


class Recipe(Section):
    name: str
    output_dir: Path = Path("runs")
    seed: int = 42
    model: ModelSection = ModelSection()
    data: DataSection
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
            raise ValueError("use letters, digits, '.', '_' and '-' only (it names the run folder)")
        return v

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["train.epochs=2", "data.labels=[a, b]"]`` into a nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. train.epochs=2), got '{item}'")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{part}' is set to a value and also used as a section")
        node[parts[-1]] = value
    return tree


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, merge and validate a recipe. Relative paths inside the YAML are relative to its folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("path"), str) and not Path(data["path"]).is_absolute():
        data["path"] = str((path.parent / data["path"]).resolve())
    merged = deep_merge(raw, parse_overrides(overrides or []))
    return validate_recipe(merged, source=str(path))


def validate_recipe(raw: dict, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(err) for err in exc.errors()]
        raise ConfigError(f"{source}: {len(lines)} problem(s):\n" + "\n".join(f"  - {line}" for line in lines)) from None


def _describe(err: dict) -> str:
    loc = [str(p) for p in err["loc"]]
    where = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        hint = _closest_key(err["loc"])
        return f"{where}: unknown key" + (f"; did you mean '{'.'.join(loc[:-1] + [hint])}'?" if hint else "")
    if err["type"] == "missing":
        return f"{where}: required but missing"
    return f"{where}: {err['msg']} (got {err.get('input')!r})"


def _closest_key(loc: tuple) -> str | None:
    """Walk the schema along ``loc[:-1]`` and return the field name nearest to ``loc[-1]``."""
    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if model else None
        ann = field.annotation if field else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    if model is None:
        return None
    matches = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.5)
    return matches[0] if matches else None


def dump_resolved(recipe: Recipe, path: Path) -> None:
    """Write the fully resolved recipe plus the versions of the packages that produced the run."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("tunesmith", "torch", "transformers", "peft", "trl", "datasets", "accelerate"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    doc = recipe.model_dump(mode="json")
    doc["_versions"] = versions
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
