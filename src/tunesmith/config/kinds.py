"""The registry of task kinds, kept here so that the recipe schema can check ``data.task``, its
``task_options`` and ``eval.baselines`` without importing the kinds themselves (they live higher up, in
:mod:`tunesmith.kinds`, and register themselves when that package is imported: every entry point does).
"""

from __future__ import annotations

from typing import Any

from tunesmith.errors import ConfigError

_REGISTRY: dict[str, Any] = {}  # name → TaskKind subclass


class TargetError(ValueError):
    """A record's target cannot be used by this task kind (the message is the rejection reason)."""


def register(cls):
    """Class decorator: make the task kind ``cls`` available under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"task kind '{cls.name}' is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    """Registered task kind names."""
    if not _REGISTRY:
        raise ConfigError("no task kind is registered: import tunesmith.kinds before loading a recipe")
    return sorted(_REGISTRY)


def kind_class(name: str):
    """The TaskKind subclass registered as ``name``."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown task kind '{name}'; known: {', '.join(names())}")
    return _REGISTRY[name]


def for_data(cfg):
    """The task kind of a data section, with its options, for reading targets (no evaluation config)."""
    return kind_class(cfg.task)(None, None, cfg.task_options)


def all_baselines() -> dict[str, str]:
    """Every baseline name any task kind offers → the kinds it applies to (for config validation)."""
    out: dict[str, list[str]] = {}
    for name in names():
        for b in _REGISTRY[name].baseline_names():
            out.setdefault(b, []).append(name)
    return {b: ", ".join(k) for b, k in out.items()}
