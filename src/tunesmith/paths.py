"""Where tunesmith keeps things on disk."""

import os
from pathlib import Path


def tunesmith_home() -> Path:
    """Root of the cache: ``$TUNESMITH_HOME`` or ``~/.cache/tunesmith``."""
    return Path(os.environ.get("TUNESMITH_HOME") or Path.home() / ".cache" / "tunesmith").expanduser()


def models_dir() -> Path:
    return tunesmith_home() / "models"
