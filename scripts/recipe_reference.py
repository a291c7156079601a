"""Write docs/recipe.md, the recipe reference, from the pydantic schema in tunesmith.config.

Every section and key with its type, default and description comes from the schema itself, so
the reference cannot drift from what recipes accept (tests/test_recipe_reference.py checks the
file is current).

    python scripts/recipe_reference.py          # rewrite docs/recipe.md
    python scripts/recipe_reference.py --check  # exit 1 when docs/recipe.md is out of date
"""

from __future__ import annotations

import argparse
import inspect
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from tunesmith.config import Recipe

OUT = Path(__file__).resolve().parents[1] / "docs" / "recipe.md"
INTRO = """# Recipe reference

A recipe is one YAML file; every key below is checked when the recipe is read (unknown keys are
refused with a did-you-mean). Override any key on the command line with `--set key.path=value`.
Generated from the schema by `python scripts/recipe_reference.py`; do not edit by hand.
"""


def type_name(ann, sections: dict[type, str]) -> str:
    """A readable type: Literal choices, unions, lists and links to nested sections."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if ann is type(None):
        return "null"
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(a, sections) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0], sections)
    if origin in (list, tuple, set):
        return f"list of {type_name(args[0], sections)}" if args else "list"
    if origin is dict:
        return f"map {type_name(args[0], sections)} → {type_name(args[1], sections)}" if args else "map"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return f"[{ann.__name__}](#{anchor(sections[ann])})" if ann in sections else ann.__name__
    return getattr(ann, "__name__", str(ann)).replace("typing.", "")


def heading(path: str) -> str:
    return path or "top level"


def anchor(path: str) -> str:
    """The anchor a markdown renderer gives the section's heading (punctuation dropped, spaces to dashes)."""
    return "".join(c for c in heading(path).lower() if c.isalnum() or c in " -_").replace(" ", "-")


def default_text(field) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is PydanticUndefined:
        return ""
    if isinstance(value, BaseModel):
        return "(section defaults)"
    if isinstance(value, Path):
        value = str(value)
    return f"`{value!r}`" if value not in ("", None, [], {}) else f"`{value!r}`".replace("None", "null")


def walk(model: type[BaseModel], path: str, sections: dict[type, str]) -> None:
    """Name every nested model by the first key path that reaches it; the shapes a key accepts
    (the kinds of data.steps) are told apart by their tag."""
    sections.setdefault(model, path)
    for name, field in model.model_fields.items():
        inner_models = models_in(field.annotation)
        for inner in inner_models:
            if inner not in sections:
                sub = f"{path}.{name}" if path else name
                walk(inner, f"{sub}: {tag(inner)}" if len(inner_models) > 1 else sub, sections)


def tag(model: type[BaseModel]) -> str:
    """The value of the model's single-choice Literal field (its discriminator), else its class name."""
    return next((typing.get_args(f.annotation)[0] for f in model.model_fields.values()
                 if typing.get_origin(f.annotation) is typing.Literal and len(typing.get_args(f.annotation)) == 1),
                model.__name__)


def models_in(ann) -> list[type[BaseModel]]:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return [m for a in typing.get_args(ann) for m in models_in(a)]


def render() -> str:
    sections: dict[type, str] = {}
    walk(Recipe, "", sections)
    parts = [INTRO]
    for model, path in sections.items():
        doc = inspect.cleandoc(model.__doc__ or "") if model.__doc__ and model.__doc__ != BaseModel.__doc__ else ""
        parts.append(f"## {heading(path)}\n")
        parts.append(f"`{model.__name__}`. {doc}\n" if doc else f"`{model.__name__}`\n")
        parts.append("| key | type | default | description |\n|---|---|---|---|")
        for name, field in model.model_fields.items():
            desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
            parts.append(f"| `{field.alias or name}` | {type_name(field.annotation, sections)} | "
                         f"{default_text(field)} | {desc} |")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="exit 1 when docs/recipe.md is out of date")
    text = render()
    if ap.parse_args().check:
        current = OUT.read_text(encoding="utf-8") if OUT.is_file() else ""
        if current != text:
            print(f"{OUT} is out of date: run python scripts/recipe_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({len(text):,} characters, {len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
