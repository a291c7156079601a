"""Reinforcement fine-tuning jobs: OpenAI's ``method: {type: "reinforcement", reinforcement: {grader,
hyperparameters}}`` trained by GRPO (``train.method: grpo``, :mod:`tunesmith.train.grpo`) with the job's grader
as the reward.

The training file holds prompts: ``messages`` that end before the answer, plus any other fields, which the grader
reads as ``{{item.*}}`` (the whole row is the item). At job creation the grader is checked, every row is checked
for the item fields the grader reads (400 naming the file and line), and each hyperparameter is mapped or refused:

- ``n_epochs``, ``learning_rate_multiplier``: as for supervised jobs;
- ``batch_size``: prompts per step (each sampled ``num_generations`` times: the step trains on their product);
- ``compute_multiplier``: completions sampled per prompt, ``round(4 x multiplier)`` (4 at 'auto'), 2 to 64;
- ``eval_interval``: steps between validation passes over the validation file ('auto': once per epoch);
- ``eval_samples``: completions sampled per validation prompt ('auto': as in training);
- ``reasoning_effort``: the models trained here have no reasoning mode: 'default' only.

Events and checkpoints carry the mean reward of each step's completions and its spread (standard deviation):
``train_reward_mean``, ``train_reward_std`` (and ``valid_reward_*`` after a validation pass); the results CSV too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from tunesmith.serve.errors import APIError

GENERATIONS = 4  # completions per prompt at compute_multiplier 1
MAX_GENERATIONS = 64
MAX_COMPLETION_TOKENS = 128  # the longest answer sampled during training


class ReinforcementHyperparameters(BaseModel):
    """The hyperparameters the official client declares (openai 3.54 ``ReinforcementHyperparameters``)."""

    model_config = ConfigDict(extra="forbid")
    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"
    compute_multiplier: float | Literal["auto"] = "auto"
    eval_interval: int | Literal["auto"] = "auto"
    eval_samples: int | Literal["auto"] = "auto"
    reasoning_effort: Literal["default", "low", "medium", "high"] | None = None


class ReinforcementMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: dict
    hyperparameters: ReinforcementHyperparameters = ReinforcementHyperparameters()


PARAM = "method.reinforcement"


def generations(hyper: dict) -> int:
    """Completions sampled per prompt for a compute multiplier."""
    multiplier = hyper.get("compute_multiplier", "auto")
    return GENERATIONS if multiplier in ("auto", None) else round(GENERATIONS * multiplier)


def check_job(request, key, method: dict, files: dict[str, Path], trainable: list[str]) -> None:
    """400 for what a reinforcement job cannot run: a bad grader, a model grader on a model the jobs worker cannot
    load, a hyperparameter it cannot honour, a file row without a field the grader reads. ``files``: the job's
    training and validation files by parameter name (``training_file``: path)."""
    from tunesmith.graders.spec import item_fields, model_names
    from tunesmith.serve.evals.grading import checked_grader

    grader = checked_grader(request, key, method["grader"], f"{PARAM}.grader")
    for name in sorted(model_names(grader)):
        if name not in trainable:
            raise APIError(400, f"{PARAM}.grader: a reinforcement job's model grader runs beside the training, which "
                           f"loads base models only: use one of {', '.join(trainable)} (not '{name}')",
                           param=f"{PARAM}.grader.model", code="invalid_grader")
    _check_hyperparameters(method.get("hyperparameters") or {}, "validation_file" in files)
    fields = item_fields(grader)
    for param, path in files.items():
        missing_field(path, fields, param)


def _check_hyperparameters(hyper: dict, validation: bool) -> None:
    where = f"{PARAM}.hyperparameters"
    if hyper.get("reasoning_effort") not in (None, "default"):
        raise APIError(400, f"reasoning_effort {hyper['reasoning_effort']!r}: the models trained here have no "
                       "reasoning mode; leave it out or use 'default'", param=f"{where}.reasoning_effort",
                       code="invalid_hyperparameter")
    n = generations(hyper)
    if not 2 <= n <= MAX_GENERATIONS:
        raise APIError(400, f"compute_multiplier {hyper['compute_multiplier']} would sample {n} completions per "
                       f"prompt; GRPO compares 2 to {MAX_GENERATIONS} (multipliers {2 / GENERATIONS:g} to "
                       f"{MAX_GENERATIONS / GENERATIONS:g}), or 'auto'", param=f"{where}.compute_multiplier",
                       code="invalid_hyperparameter")
    for name in ("eval_interval", "eval_samples"):
        value = hyper.get(name, "auto")
        if value == "auto":
            continue
        if isinstance(value, bool) or value < 1:
            raise APIError(400, f"{name} must be at least 1, or 'auto'; got {value}", param=f"{where}.{name}",
                           code="invalid_hyperparameter")
        if not validation:
            raise APIError(400, f"{name} sets the validation passes, and this job has no validation_file; give one "
                           "or leave it 'auto'", param=f"{where}.{name}", code="invalid_hyperparameter")


def missing_field(path: Path, fields: set[str], param: str) -> None:
    """The first row of a reinforcement file without a field the grader reads: a 400 naming the line."""
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        lacking = sorted(fields - set(json.loads(line)))
        if lacking:
            raise APIError(400, f"{param} line {lineno}: no field {lacking[0]!r}, which the grader reads as "
                           f"{{{{item.{lacking[0]}}}}}; every row needs "
                           + ", ".join(repr(f) for f in sorted(fields)), param=param, code="invalid_file_format")


def read_rows(path: Path) -> list[dict]:
    """A reinforcement file → GRPO rows: the prompt messages (developer as system) and the row as the item."""
    from tunesmith.data.formats.validate import as_system
    from tunesmith.train.grpo import ITEM

    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows.append({"prompt": as_system(row["messages"]), ITEM: json.dumps(row, ensure_ascii=False)})
    return rows


def train_section(method: dict, hyper: dict, has_validation: bool) -> dict:
    """The recipe's train keys for a reinforcement job, ``hyper`` resolved (epochs, batch size, learning rate)."""
    n = generations(hyper)
    grpo = {"reward": [method["reinforcement"]["grader"]], "num_generations": n,
            "max_completion_length": MAX_COMPLETION_TOKENS}
    if hyper.get("eval_samples", "auto") != "auto":
        grpo["eval_generations"] = hyper["eval_samples"]
    train = {"method": "grpo", "batch_size": hyper["batch_size"] * n, "grpo": grpo}
    if has_validation and hyper.get("eval_interval", "auto") != "auto":
        train["eval_steps"] = hyper["eval_interval"]
    return train


def reward_metrics(logs: dict) -> dict:
    """A GRPO log entry's rewards in the job's metric names (empty for other methods)."""
    out = {}
    for ours, trl in (("train_reward_mean", "reward"), ("train_reward_std", "reward_std"),
                      ("valid_reward_mean", "eval_reward"), ("valid_reward_std", "eval_reward_std")):
        if logs.get(trl) is not None:
            out[ours] = logs[trl]
    return out
