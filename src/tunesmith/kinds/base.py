"""The contract every task kind fulfils, and the one scorer all contenders share.

Every contender (local model, endpoint, baseline) goes through :func:`score_outputs` with the
same parser and scorer, so the comparison is fair. ``per_example`` holds the headline metric per
example (correct 0/1, absolute error, F1, chrF): that is what the bootstrap resamples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel

from tunesmith.records import Example
from tunesmith.scoring.display import num, signed
from tunesmith.scoring.result import ContenderResult, Source

Cell = Callable[[dict], str]


@dataclass
class BaselineInputs:
    """What an LLM-free baseline sees: the rendered prompts and targets of train, the test prompts."""

    train_texts: list[str]
    train_examples: list[Example]
    test_texts: list[str]
    seed: int


@dataclass
class Baseline:
    name: str
    description: str
    predict: Callable[[TaskKind, BaselineInputs], list]  # one prediction per test text
    needs: str | None = None  # an optional package it needs (skipped with a note without it)


class TaskKind:
    """Base class: free generation scored by the subclass's ``parse``/``score``/``metrics``."""

    name: ClassVar[str]
    headline: ClassVar[str]
    higher_is_better: ClassVar[bool] = True
    uses_labels: ClassVar[bool] = False  # a closed label set (classification)
    stratify: ClassVar[bool] = False  # whether a seeded split may stratify on the target
    options_model: ClassVar[type[BaseModel] | None] = None  # what data.task_options may hold for this kind

    def __init__(self, cfg, labels: list[str] | None = None, options: dict | BaseModel | None = None):
        self.cfg = cfg  # the recipe's eval section
        self.labels = list(labels or [])
        self.options = self.parse_options(options)

    @classmethod
    def parse_options(cls, raw: dict | BaseModel | None) -> BaseModel | None:
        """``data.task_options`` checked against this kind's options model (ValueError naming each problem);
        None when not given (the kind used only for its name-level facts, e.g. its headline metric)."""
        if raw is None or isinstance(raw, BaseModel) or (cls.options_model is None and not raw):
            return None if cls.options_model is None else raw
        if cls.options_model is None:
            raise ValueError(f"the {cls.name} task takes no task_options (got {sorted(raw)})")
        from pydantic import ValidationError

        try:
            return cls.options_model.model_validate(raw or {})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'task_options'}: {e['msg']}"
                                 for e in exc.errors())
            raise ValueError(f"task_options for the {cls.name} task: {problems}") from None

    # --- data -----------------------------------------------------------------------------
    def read_target(self, value: Any, record: dict) -> tuple[str, dict]:
        """The example's target text and extra meta from a record's target value; TargetError if unusable."""
        text = value.strip() if isinstance(value, str) else str(value)
        return text, {}

    # --- scoring --------------------------------------------------------------------------
    def parse(self, output: str | None) -> Any:
        """The strict parse of one raw output; ``None`` means unparseable (or no output at all)."""
        return None if output is None else output.strip()

    def gold(self, ex: Example) -> Any:
        return ex.target

    def score(self, parsed: Any, ex: Example) -> float | None:
        raise NotImplementedError

    def correct(self, parsed: Any, ex: Example) -> bool | None:
        raise NotImplementedError

    def metrics(self, parsed: Sequence[Any], examples: Sequence[Example]) -> dict:
        raise NotImplementedError

    # --- local models ---------------------------------------------------------------------
    def evaluate_local(self, name, description, model, tokenizer, prompts, examples, bar) -> ContenderResult:
        """Greedy generation on the prompts, scored like every other contender."""
        from tunesmith.generation import generate_greedy

        cfg = self.cfg
        with bar(f"eval {name}: generate", len(prompts)) as advance:
            outputs = generate_greedy(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, advance, stop=cfg.stop)
        return score_outputs(self, name, description, Source.LOCAL, examples, prompts, outputs)

    # --- baselines ------------------------------------------------------------------------
    @classmethod
    def baselines(cls) -> list[Baseline]:
        return []

    @classmethod
    def baseline_names(cls) -> list[str]:
        return [b.name for b in cls.baselines()]

    def format_baseline(self, prediction) -> str:
        return prediction if isinstance(prediction, str) else f"{prediction:.2f}"

    # --- report ---------------------------------------------------------------------------
    def fmt(self, v) -> str:
        """How the headline metric is printed."""
        return num(v, "{:.2f}")

    def diff_fmt(self, v) -> str:
        return signed(v)

    def columns(self) -> list[tuple[str, Cell]]:
        """Task-specific report columns after the headline and its difference."""
        return []

    def notes(self) -> str:
        return ""

    def plots(self, results: list[ContenderResult], test: list[Example], eval_dir: Path) -> dict[str, Path]:
        return {}


def score_outputs(
    task: TaskKind,
    name: str,
    description: str,
    source: Source | str,
    examples: Sequence[Example],
    prompts: Sequence[str],
    outputs: Sequence[str | None],
    errors: Sequence[str | None] | None = None,
    parsed: Sequence[Any] | None = None,
    scoring: str | None = None,
) -> ContenderResult:
    """Parse (unless ``parsed`` is given, e.g. label scoring) and score raw outputs.

    ``source`` says where the outputs come from (a :class:`Source` or its value); ``errors`` (endpoint
    failures) are reported per example.
    """
    source = Source(source)
    errors = list(errors) if errors is not None else [None] * len(outputs)
    parsed = list(parsed) if parsed is not None else [task.parse(o) for o in outputs]
    metrics = task.metrics(parsed, examples)
    metrics["scoring"] = scoring or ("direct prediction" if source is Source.BASELINE else "free generation")
    if source is Source.ENDPOINT:
        metrics["failed_calls"] = sum(e is not None for e in errors)
    rows = [
        {
            "model": name,
            "id": ex.id,
            "prompt": p,
            "output": o,
            "parsed": pa,
            "gold": task.gold(ex),
            "correct": task.correct(pa, ex),
            **({"error": err} if err else {}),
        }
        for ex, p, o, pa, err in zip(examples, prompts, outputs, parsed, errors, strict=True)
    ]
    per = [task.score(pa, ex) for pa, ex in zip(parsed, examples, strict=True)]
    return ContenderResult(name, description, metrics, rows, parsed, per, source)
