"""Every shipped recipe validates against the one config schema (a renamed key fails here, not for a user)."""

from pathlib import Path

import pytest

from tunesmith.config import load_recipe

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name and (recipe.data is not None or recipe.synth is not None)


def test_arms_of_the_head_vs_generative_recipes_differ_only_in_the_head():
    for name in ("nsmc_binary.yaml", "nsmc_stars.yaml"):
        recipe = load_recipe(EXAMPLES[0].parent / name)
        assert [a.name for a in recipe.arms] == ["head", "generative"], name
        assert recipe.arms[0].train["head"] == "classifier" and "head" not in (recipe.arms[1].train or {})


def test_banking77_full_trains_the_measured_method():
    """The method docs/results.md chose by measurement: LoRA + classifier head, lr 1e-3, 2 epochs, grouped."""
    recipe = load_recipe(EXAMPLES[0].parent / "banking77_full.yaml")
    assert [a.name for a in recipe.arms] == ["head"]
    assert recipe.arms[0].train == {"head": "classifier", "learning_rate": 1.0e-3}
    assert recipe.train.epochs == 2 and recipe.train.adapter == "lora" and recipe.train.lora.r == 16
    assert recipe.train.model_copy(update={"head": "classifier"}).grouped
