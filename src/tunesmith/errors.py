"""Our own error types: every failure a user can act on is one of these, raised at a boundary.

The CLI maps them to exit codes (ConfigError → 2, DataError → 3, others → 1).
"""


class TunesmithError(Exception):
    """Base class; the message is meant to be shown to the user as is."""

    exit_code = 1


class ConfigError(TunesmithError):
    """A recipe, an override or a command-line value is wrong."""

    exit_code = 2


class DataError(TunesmithError):
    """Input data is missing or malformed; the message names file and line or field."""

    exit_code = 3


class ModelError(TunesmithError):
    """A model cannot be found, fetched, converted or loaded."""


class TrainingError(TunesmithError):
    """Training failed (out of memory, diverged, interrupted)."""


class ProviderError(TunesmithError):
    """An LLM endpoint failed."""

