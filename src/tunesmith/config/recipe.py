"""The recipe: its top-level keys, the model section, and the arms compared in one run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tunesmith.config.data import DataSection
from tunesmith.config.eval import EvalSection
from tunesmith.config.section import Section
from tunesmith.config.synth import SynthSection
from tunesmith.config.train import HEAD_TASKS, HostedSection, TrainSection


class ModelSection(Section):
    name: str = Field("smollm2-135m-instruct", description="embedded model name, local folder or HF id")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"

    @property
    def folder(self) -> str:
        """What ``from_pretrained`` loads for ``name``: the model registry's answer (a cached folder, a local
        folder, or a hub id)."""
        from tunesmith.models.names import resolve

        return resolve(self.name)


ARM_DATA_KEYS = ("prompt", "system_prompt", "order")


class ArmSpec(Section):
    """A named variant of the fine-tune: overrides of the data (prompt, system prompt, train order),
    synth and train sections. Every arm trains its own adapter on the same split."""

    name: str
    description: str = ""
    data: dict[str, Any] = {}
    model: dict[str, Any] = Field({}, description="model overrides, e.g. an encoder backbone for a head arm")
    train: dict[str, Any] = {}
    synth: dict[str, Any] | None = Field(None, description="synth overrides; null turns the synth stage off")
    from_arm: str | None = Field(None, description="start from this (earlier) arm's trained adapter, e.g. SFT then DPO")

    @field_validator("name")
    @classmethod
    def _folder_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", v) or v in ("base",):
            raise ValueError("use letters, digits, '.', '_' and '-' (it names a folder); 'base' is taken")
        return v

    @field_validator("data")
    @classmethod
    def _data_keys(cls, v: dict) -> dict:
        bad = sorted(set(v) - set(ARM_DATA_KEYS))
        if bad:
            raise ValueError(f"an arm may override data.{{{', '.join(ARM_DATA_KEYS)}}} only (the split is shared "
                             f"by every arm), not {bad}")
        return v


class Recipe(Section):
    name: str
    output_dir: Path = Path("runs")
    seed: int = 42
    model: ModelSection = ModelSection()
    data: DataSection | None = Field(None, description="required unless train.method is dpo or the recipe only synthesises")
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    synth: SynthSection | None = None
    hosted: HostedSection | None = None
    arms: list[ArmSpec] = Field([], description="named variants trained on the same split and compared side by side")

    def with_train(self, **changes) -> Recipe:
        """A copy with these ``train`` settings changed (decided at run time: a measured length, a fitted batch)."""
        return self.model_copy(update={"train": self.train.model_copy(update=changes)})

    @model_validator(mode="before")
    @classmethod
    def _legacy_eval_task(cls, raw: Any) -> Any:
        """Older recipes set the task kind as ``eval.task``; it is ``data.task`` now."""
        ev = raw.get("eval") if isinstance(raw, dict) else None
        if isinstance(ev, dict) and "task" in ev:
            ev = dict(ev)
            kind = ev.pop("task")
            raw = {**raw, "eval": ev}
            if kind != "auto" and isinstance(raw.get("data"), dict):
                raw["data"] = {**raw["data"], "task": kind}
        return raw

    @model_validator(mode="after")
    def _arms_are_distinct(self) -> Recipe:
        names = [a.name for a in self.arms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"arms: names must be unique; repeated: {dup}")
        for i, arm in enumerate(self.arms):
            if arm.from_arm and arm.from_arm not in names[:i]:
                raise ValueError(f"arms[{i}] ({arm.name}): from_arm '{arm.from_arm}' is not an earlier arm ({names[:i]})")
        return self

    @model_validator(mode="after")
    def _train_data_comes_from_somewhere(self) -> Recipe:
        splits = self.data.splits if self.data else None
        if splits is not None and splits.train is None and self.synth is None and not any(a.synth for a in self.arms):
            raise ValueError("data.splits.train: required unless a synth section makes the training data")
        return self

    @model_validator(mode="after")
    def _head_fits_the_task(self) -> Recipe:
        """Each head answers one task kind; an encoder cannot generate (checked where the recipe trains: no arms)."""
        want = HEAD_TASKS.get(self.train.head)
        if want and self.data is not None and self.task_kind != want:
            raise ValueError(f"train.head {self.train.head} needs data.task {want} (this recipe's task is {self.task_kind})")
        if not self.arms and self.train.head == "generative":
            from tunesmith.models.encoders import is_encoder

            if is_encoder(self.model.name):
                raise ValueError(f"model.name {self.model.name} is an encoder: it trains a head (train.head "
                                 "classifier, regression or span), it cannot generate")
        return self

    @model_validator(mode="after")
    def _dpo_has_pairs(self) -> Recipe:
        made = self.synth is not None and self.synth.task == "preference_pairs"
        if self.train.method == "dpo" and self.train.dpo.path is None and not made:
            raise ValueError("train.method dpo needs train.dpo.path (a preference JSONL file), or a synth section "
                             "with task preference_pairs that makes the pairs from the train split")
        return self

    @property
    def task_kind(self) -> str:
        return self.data.task if self.data else "generation"

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
            raise ValueError("use letters, digits, '.', '_' and '-' only (it names the run folder)")
        return v

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name

    def refuse_folds(self, command: str) -> None:
        """Cross-validation trains and scores every fold in one ``tunesmith run``; other commands use one split."""
        if self.data is not None and self.data.split.folds:
            from tunesmith.errors import ConfigError

            raise ConfigError(f"data.split.folds: cross-validation trains and evaluates every fold in one "
                              f"`tunesmith run`; `{command}` works on one split: run the recipe, or remove "
                              "data.split.folds")
