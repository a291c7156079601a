"""The training methods' shapes, registered by each method's module in :mod:`tunesmith.train`: what the training
path, the memory estimate and a run need to know of a method without importing it.

A method registers one :class:`MethodSpec` with :func:`register_method` (``tunesmith.train`` imports every
method module, so importing it registers them all).
"""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.errors import ConfigError


@dataclass(frozen=True)
class MethodSpec:
    """A training method's data and memory shape."""

    name: str
    sequences_per_example: int = 1  # rows the model forwards per training example (DPO: the chosen and the rejected)
    packs: bool = True  # whether several examples may share a row
    unpacked_reason: str = ""  # why not, as the training path states it
    loss: tuple[str, str] | None = None  # the loss form the method always scores with, and why (None: the recipe's)
    logit_bytes_per_token: int | None = None  # what its loss holds per token, where it is not the vocabulary's logits
    reads_pairs: bool = False  # trains on preference pairs (train.dpo.path or a synth stage's), not the train split
    generates: bool = False  # samples its own completions of the train split's prompts (the targets are not trained on)


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.name in _METHODS and _METHODS[spec.name] != spec:
        raise ValueError(f"training method '{spec.name}' is registered twice")
    _METHODS[spec.name] = spec
    return spec


def method_spec(name: str) -> MethodSpec:
    """The registered shape of the method ``name``."""
    if name not in _METHODS:
        known = ", ".join(sorted(_METHODS)) or "none (import tunesmith.train first)"
        raise ConfigError(f"train.method {name}: no such training method is registered; known: {known}")
    return _METHODS[name]
