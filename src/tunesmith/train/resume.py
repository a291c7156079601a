"""Find the checkpoint to resume from."""

from __future__ import annotations

import re
from pathlib import Path

from tunesmith.errors import ConfigError


def newest_checkpoint(folder: Path) -> Path:
    """The ``checkpoint-<step>`` folder with the highest step that holds a complete trainer state.

    A folder without ``trainer_state.json`` was cut off while being written (the process was
    killed mid-save) and is skipped.
    """
    found = complete_checkpoint(folder)
    if found is None:
        raise ConfigError(
            f"--resume: no complete checkpoint in {folder}. Train without --resume first, or set "
            "train.save_steps so that checkpoints are written during training."
        )
    return found


def complete_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = []
    for child in Path(folder).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", child.name)
        if m and (child / "trainer_state.json").is_file():
            found.append((int(m.group(1)), child))
    return max(found)[1] if found else None
