"""A recipe that needs data not in the repository says so in its first line (``# Needs data not in the repository:
... ``), and loading it fails with that line when a file it names is missing, instead of a bare "not found"."""

from __future__ import annotations

from pathlib import Path

from tunesmith.errors import ConfigError

NEEDS = "# Needs data not in the repository:"


def named_files(raw: dict) -> list[str]:
    """The data files a recipe names (data.path, data.splits.*, synth.input, seed contexts, train.dpo.path)."""
    data, synth, train = (raw.get(k) if isinstance(raw.get(k), dict) else {} for k in ("data", "synth", "train"))
    splits = data.get("splits") if isinstance(data.get("splits"), dict) else {}
    seeds = synth.get("seed_questions") if isinstance(synth.get("seed_questions"), dict) else {}
    dpo = train.get("dpo") if isinstance(train.get("dpo"), dict) else {}
    found = [data.get("path"), *splits.values(), synth.get("input"), seeds.get("contexts"), dpo.get("path")]
    return [p for p in found if isinstance(p, str)]


def check_needed_data(raw: dict, path: Path, text: str) -> None:
    """Fail with the recipe's first line when it says it needs outside data and a file it names is missing."""
    first = text.lstrip("\ufeff").splitlines()[0] if text.strip() else ""
    if not first.startswith(NEEDS):
        return
    missing = [p for p in named_files(raw) if not Path(p).exists()]
    if missing:
        raise ConfigError(f"{path}: {first.removeprefix('# ')} (missing: {missing[0]}; or point the recipe at your "
                          "own copy, e.g. --set data.path=FILE)")
