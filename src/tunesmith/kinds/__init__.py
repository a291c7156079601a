"""Task kinds, registered by name: each owns how targets are read, how answers are parsed and
scored, its metrics, its report columns and the baselines that apply to it.

Adding a kind is one module in this package that subclasses :class:`TaskKind` and decorates it
with :func:`register`; every module here is imported when the registry is first used.
"""

from __future__ import annotations

import importlib
import pkgutil

from tunesmith.kinds.base import Baseline, TaskKind, score_outputs

_REGISTRY: dict[str, type[TaskKind]] = {}


def register(cls: type[TaskKind]) -> type[TaskKind]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"task kind '{cls.name}' is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def names() -> list[str]:
    """Registered task kind names."""
    _load_all()
    return sorted(_REGISTRY)


def kind_class(name: str) -> type[TaskKind]:
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown task kind '{name}'; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def make_task(name: str, cfg, labels=(), options: dict | None = None) -> TaskKind:
    """An instance of the task kind ``name`` for an evaluation config, its labels (classification) and its
    ``data.task_options`` (extraction's fields)."""
    return kind_class(name)(cfg, list(labels), options)


def for_data(cfg) -> TaskKind:
    """The task kind of a data section, with its options, for reading targets (no evaluation config)."""
    return kind_class(cfg.task)(None, None, cfg.task_options)


def all_baselines() -> dict[str, str]:
    """Every baseline name any task kind offers → the kinds it applies to (for config validation)."""
    out: dict[str, list[str]] = {}
    for name in names():
        for b in _REGISTRY[name].baseline_names():
            out.setdefault(b, []).append(name)
    return {b: ", ".join(k) for b, k in out.items()}


__all__ = ["Baseline", "TaskKind", "all_baselines", "for_data", "kind_class", "make_task", "names", "register", "score_outputs"]
