"""Graders as training rewards: a function TRL's ``GRPOTrainer`` calls once per batch of completions.

TRL calls ``reward(prompts=..., completions=..., **columns)`` with the dataset's other columns as lists,
one entry per completion; the grader's ``item`` is that row's columns and its ``sample`` the completion
(plain text, or the assistant message of a conversational completion). The whole batch is graded with one
:func:`grade_batch` call (one python process, one model batch). Rewards that could not be computed are 0,
as at OpenAI; the share of such rows is logged as ``<name>/errored`` through TRL's ``log_metric``, and
``on_graded`` sees every :class:`Graded` (errors and timings).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from tunesmith.graders.model import ChatBackend, EndpointBackend, LocalBackend
from tunesmith.graders.run import Context, Graded, grade_batch

TRL_ARGS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric", "environments")


def completion_text(completion) -> str:
    """A completion as text: a string as is; a conversational completion's last message's content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content") or "")
    return str(completion)


def reward_function(grader: dict, context: Context | None = None,
                    on_graded: Callable[[list[Graded]], None] = lambda graded: None, item_column: str | None = None):
    """A TRL reward function over a checked grader (see :func:`tunesmith.graders.check`). With ``item_column`` each
    row's item is that column's JSON object text (items of any shape, which a dataset's columns cannot hold)."""

    def reward(prompts=None, completions=(), **columns) -> list[float]:
        if item_column is not None:
            items = [json.loads(text) for text in columns[item_column]]
        else:
            items = [{k: v[i] for k, v in columns.items() if k not in TRL_ARGS and isinstance(v, list)}
                     for i in range(len(completions))]
        graded = grade_batch(grader, [completion_text(c) for c in completions], items, context)
        on_graded(graded)
        if callable(columns.get("log_metric")) and graded:  # TRL averages it per logging step
            columns["log_metric"](f"{reward.__name__}/errored", sum(g.errored for g in graded) / len(graded))
        return [g.reward for g in graded]

    reward.__name__ = f"grader_{grader.get('name', grader['type'])}"  # TRL logs each reward under its name
    return reward


def model_backends(endpoints=(), max_tokens: int = 64) -> Callable[[str], ChatBackend]:
    """Backends for score_model / label_model graders outside the server: a model named like one of the
    ``endpoints`` (``EndpointSpec``: ``eval.endpoints`` entries) is asked there; any other name is loaded
    locally (embedded name, folder or HF id), once."""
    by_name = {spec.name: spec for spec in endpoints}
    cache: dict[str, ChatBackend] = {}

    def backend(model: str) -> ChatBackend:
        if model not in cache:
            spec = by_name.get(model)
            cache[model] = EndpointBackend(spec, max_tokens) if spec else LocalBackend(model, max_tokens)
        return cache[model]

    return backend
