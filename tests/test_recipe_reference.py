"""docs/recipe.md is generated from the schema and must be current."""

import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_reference_is_current():
    script = runpy.run_path(str(ROOT / "scripts" / "recipe_reference.py"))
    text = script["render"]()
    assert (ROOT / "docs" / "recipe.md").read_text(encoding="utf-8") == text, (
        "docs/recipe.md is out of date: run python scripts/recipe_reference.py")


def test_reference_names_every_key_of_every_section():
    from tunesmith.config import Recipe

    script = runpy.run_path(str(ROOT / "scripts" / "recipe_reference.py"))
    sections: dict = {}
    script["walk"](Recipe, "", sections)
    text = script["render"]()
    for model in sections:
        for name in model.model_fields:
            assert f"| `{name}` |" in text, (model.__name__, name)
    assert "| `report_to` | list of `tensorboard` \\| `trackio` \\| `mlflow` \\| `wandb` |" in text
