"""The one way an API key is read: from the environment variable a recipe or endpoint names, never from a file."""

from __future__ import annotations

import os

from tunesmith.errors import ConfigError


def api_key(env: str | None, setting: str, error: type[Exception] = ConfigError) -> str:
    """The key in the environment variable ``env`` (named by the recipe key ``setting``); a placeholder where
    ``env`` is unset (a server that needs no key). A named variable that is empty raises ``error``."""
    if not env:
        return "not-needed"
    key = os.environ.get(env)
    if not key:
        raise error(f"No API key: set the environment variable {env} ({setting}), or set {setting}: null "
                    "for a server that needs none")
    return key
