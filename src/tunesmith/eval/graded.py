"""``eval.graders``: OpenAI grader objects scored on every contender's answers, each a column of the report
with its 95% bootstrap interval and the paired difference from the first contender, like any metric.

A grader sees ``{{sample.output_text}}`` = the contender's raw answer and ``{{item.*}}`` = the example's
input fields plus ``target`` (the gold answer). Model graders ask an ``eval.endpoints`` entry of the same
name, or load that model locally; python graders run sandboxed (see docs/serve.md). A row the grader
cannot grade scores 0, as at OpenAI, and is counted in ``grader_<name>_errored``.
"""

from __future__ import annotations

from tunesmith.errors import ConfigError
from tunesmith.graders import Context, GraderError, check, grade_batch, model_backends
from tunesmith.records import Example
from tunesmith.scoring.bootstrap import diff_ci, mean_ci
from tunesmith.scoring.result import ContenderResult


def checked_graders(recipe) -> list[dict]:
    """The recipe's graders, checked before any model runs (ConfigError naming ``eval.graders.<i>.<field>``)."""
    graders = []
    for i, grader in enumerate(recipe.eval.graders):
        try:
            graders.append(check(grader, f"eval.graders.{i}"))
        except GraderError as exc:
            raise ConfigError(str(exc)) from None
    names = [g["name"] for g in graders]
    if len(set(names)) != len(names):
        raise ConfigError(f"eval.graders: names must differ (they name report columns); got {names}")
    return graders


def add_grader_metrics(recipe, results: list[ContenderResult], test: list[Example]) -> None:
    """Each grader's mean reward per contender (``grader_<name>``), its interval and its paired difference
    from the first contender; each prediction row gets its reward."""
    graders = checked_graders(recipe)
    if not graders or not results:
        return
    context = Context(backends=model_backends(recipe.eval.endpoints, recipe.eval.max_new_tokens))
    items = [{**ex.inputs, "target": ex.target} for ex in test]
    resamples, seed = recipe.eval.bootstrap, recipe.seed
    per: dict[str, dict[str, list[float]]] = {}
    for grader in graders:
        key = f"grader_{grader['name']}"
        for r in results:
            outputs = [row.get("output") or "" for row in r.predictions]
            graded = grade_batch(grader, outputs, items[: len(outputs)], context)
            rewards = [g.reward for g in graded]
            per.setdefault(key, {})[r.name] = rewards
            for row, g in zip(r.predictions, graded, strict=True):
                row[key] = g.reward
            r.metrics[key] = sum(rewards) / len(rewards) if rewards else None
            r.metrics[f"{key}_errored"] = sum(g.errored for g in graded)
            if resamples > 0:
                r.metrics[f"{key}_ci95"] = mean_ci(rewards, resamples, seed)
        ref = results[0]
        for r in results[1:]:
            a, b = per[key][r.name], per[key][ref.name]
            if len(a) == len(b) and a:
                r.metrics[f"{key}_diff_vs_{ref.name}"] = sum(x - y for x, y in zip(a, b, strict=True)) / len(a)
                if resamples > 0:
                    r.metrics[f"{key}_diff_vs_{ref.name}_ci95"] = diff_ci(a, b, resamples, seed)
