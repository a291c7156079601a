"""Reading a recipe: YAML, ``--set`` overrides, arms merged over the run, every error worded at once
with a did-you-mean, and the resolved recipe written beside what it produced.

Precedence: defaults < recipe YAML < ``--set a.b=c`` overrides.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from tunesmith.config.recipe import ArmSpec, Recipe
from tunesmith.errors import ConfigError


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["train.epochs=2", "data.labels=[a, b]"]`` into a nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. train.epochs=2), got '{item}'")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{part}' is set to a value and also used as a section")
        node[parts[-1]] = value
    return tree


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_recipe(path: str | Path, overrides: list[str] | None = None, check_files: bool = True) -> Recipe:
    """Read, merge and validate a recipe. Relative paths inside the YAML are relative to its folder. A recipe
    whose first line says it needs data not in the repository fails with that line when a file is missing
    (``check_files=False``: the schema alone, e.g. to check a shipped recipe without its data)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Recipe file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    for section, key in (("data", "path"), ("synth", "input"), ("synth", "prompt_file")):
        _resolve_relative(raw.get(section), key, path.parent)
    if isinstance(raw.get("synth"), dict):
        _resolve_relative(raw["synth"].get("seed_questions"), "contexts", path.parent)
    if isinstance(raw.get("data"), dict):
        for key in ("train", "val", "test"):
            _resolve_relative(raw["data"].get("splits"), key, path.parent)
    if isinstance(raw.get("train"), dict):
        _resolve_relative(raw["train"].get("dpo"), "path", path.parent)
    top = parse_overrides(overrides or [])
    if isinstance(top.get("arms"), dict):  # --set arms.NAME.train.epochs=2 changes one arm, keeps the others
        top["arms"] = merge_named_arms(raw.get("arms"), top["arms"])
    merged = deep_merge(raw, top)
    from tunesmith.config.needed import check_needed_data

    if check_files:
        check_needed_data(merged, path, text)
    return validate_recipe(merged, source=str(path))


def merge_named_arms(arms: Any, changes: dict[str, Any]) -> list:
    """The recipe's arms with ``changes`` (arm name → overrides) merged into the arms of those names."""
    arms = arms if isinstance(arms, list) else []
    names = [a.get("name") for a in arms if isinstance(a, dict)]
    unknown = sorted(set(changes) - set(names))
    if unknown:
        raise ConfigError(f"--set arms.{unknown[0]}...: the recipe has no arm named '{unknown[0]}' "
                          f"(its arms: {', '.join(map(str, names)) or 'none'}); set the whole list with --set 'arms=[...]'")
    out = []
    for arm in arms:
        change = changes.get(arm.get("name")) if isinstance(arm, dict) else None
        if change is not None and not isinstance(change, dict):
            raise ConfigError(f"--set arms.{arm['name']}: give a key inside the arm, e.g. arms.{arm['name']}.train.epochs=2")
        out.append(deep_merge(arm, change) if change else arm)
    return out


def _resolve_relative(section, key: str, base: Path) -> None:
    """Make a relative path in the YAML relative to the recipe's folder."""
    if isinstance(section, dict) and isinstance(section.get(key), str) and not Path(section[key]).is_absolute():
        section[key] = str((base / section[key]).resolve())


def validate_recipe(raw: dict, source: str = "recipe") -> Recipe:
    """Validate a merged recipe and each of its arms; every problem is reported at once."""
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        _raise_problems(source, [_describe(err) for err in exc.errors()])
    lines = []
    for i, arm in enumerate(recipe.arms):
        try:
            arm_recipe(recipe, arm)
        except ValidationError as exc:
            lines += [f"arms[{i}] ({arm.name}): {_describe(err)}" for err in exc.errors()]
    if lines:
        _raise_problems(source, lines)
    return recipe


def _raise_problems(source: str, lines: list[str]):
    raise ConfigError(f"{source}: {len(lines)} problem(s):\n" + "\n".join(f"  - {line}" for line in lines)) from None


def arm_recipe(recipe: Recipe, arm: ArmSpec) -> Recipe:
    """The recipe an arm trains with: its overrides merged over the run's sections, writing under
    ``<run>/arms/<arm>/``. Raises pydantic's ValidationError (paths from the recipe's root)."""
    doc = recipe.model_dump(mode="json", exclude={"arms"})
    doc["data"] = deep_merge(doc["data"] or {}, arm.data)
    doc["train"] = deep_merge(doc["train"], arm.train)
    doc["model"] = deep_merge(doc["model"], arm.model)
    if "synth" in arm.model_fields_set:
        doc["synth"] = None if arm.synth is None else deep_merge(doc.get("synth") or {}, arm.synth)
    doc["name"], doc["output_dir"] = arm.name, str(recipe.run_dir / "arms")
    return Recipe.model_validate(doc)


def _describe(err: dict) -> str:
    loc = [str(p) for p in err["loc"]]
    where = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        hint = _closest_key(err["loc"])
        return f"{where}: unknown key" + (f"; did you mean '{'.'.join(loc[:-1] + [hint])}'?" if hint else "")
    if err["type"] == "missing":
        return f"{where}: required but missing"
    return f"{where}: {err['msg']} (got {err.get('input')!r})"


def _models_in(ann) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation (through Annotated, list, dict, unions, Optional)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return [m for arg in get_args(ann) for m in _models_in(arg)]


def _closest_key(loc: tuple) -> str | None:
    """Walk the schema along ``loc[:-1]`` and return the field name nearest to ``loc[-1]``.

    List indices are skipped, and a discriminated union's tag (e.g. the step name ``numeric_range``
    in ``data.steps.0.numeric_range.field``) selects the member model."""
    models: list[type[BaseModel]] = [Recipe]
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        owners = [m for m in models if str(part) in m.model_fields]
        if owners:
            models = _models_in(owners[0].model_fields[str(part)].annotation)
            continue
        tagged = [m for m in models if any(str(part) in get_args(f.annotation) for f in m.model_fields.values())]
        if not tagged:
            return None
        models = tagged
    names = sorted({name for m in models for name in m.model_fields})
    matches = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.5)
    return matches[0] if matches else None


def dump_resolved(recipe: Recipe, path: Path) -> None:
    """Write the fully resolved recipe plus the versions of the packages that produced the run."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("tunesmith", "torch", "transformers", "peft", "trl", "datasets", "accelerate"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    doc = recipe.model_dump(mode="json")
    doc["_versions"] = versions
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
