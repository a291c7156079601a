"""Task kinds: each owns how targets are read, how answers are parsed and scored, its metrics, its report
columns and the baselines that apply to it.

Adding a kind is one module in this package that subclasses :class:`TaskKind` and decorates it with
:func:`register` (the registry lives in :mod:`tunesmith.config.kinds`, where the recipe schema reads it);
importing this package imports every kind module, so that each is registered.
"""

from __future__ import annotations

from tunesmith.config.kinds import TargetError, all_baselines, for_data, kind_class, names, register
from tunesmith.kinds import classification, extraction, freeform, qa, regression  # noqa: F401 - registers each kind
from tunesmith.kinds.base import Baseline, TaskKind, score_outputs


def make_task(name: str, cfg, labels=(), options: dict | None = None) -> TaskKind:
    """An instance of the task kind ``name`` for an evaluation config, its labels (classification) and its
    ``data.task_options`` (extraction's fields)."""
    return kind_class(name)(cfg, list(labels), options)


__all__ = ["Baseline", "TargetError", "TaskKind", "all_baselines", "for_data", "kind_class", "make_task", "names",
           "register", "score_outputs"]
