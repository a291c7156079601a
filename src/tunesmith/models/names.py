"""What a recipe's ``model.name`` stands for: a shipped encoder, a random-weight architecture, or a model of the
registry (embedded, added, a local folder, a hub id)."""

from __future__ import annotations

from tunesmith.models.encoders import ENCODERS, encoder_folder
from tunesmith.models.random_weights import folder_for
from tunesmith.models.registry import local_folder


def resolve(name: str) -> str:
    """Turn a recipe's ``model.name`` into something ``from_pretrained`` accepts.

    A shipped encoder (``models/encoders.py``) resolves to its transformers folder, ``random:<arch>`` to its
    folder of config and tokenizer (no weights, see :mod:`tunesmith.models.random_weights`), anything else
    as the registry resolves it (:func:`tunesmith.models.registry.local_folder`).
    """
    if name in ENCODERS:
        return encoder_folder(name)
    if name.startswith("random:"):  # an architecture with random weights (speed and memory work)
        return str(folder_for(name))
    return local_folder(name)
