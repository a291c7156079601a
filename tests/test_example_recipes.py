"""Every shipped recipe validates against the one config schema (a renamed key fails here, not for a user)."""

from pathlib import Path

import pytest

from tunesmith.config import load_recipe

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_recipe_validates(path):
    recipe = load_recipe(path, check_files=False)  # the schema; a clone has no ../shared data
    assert recipe.name and (recipe.data is not None or recipe.synth is not None)


def test_arms_of_the_head_vs_generative_recipes_differ_only_in_the_head():
    for name in ("nsmc_binary.yaml", "nsmc_stars.yaml"):
        recipe = load_recipe(EXAMPLES[0].parent / name, check_files=False)
        assert [a.name for a in recipe.arms][:2] == ["head", "generative"], name
        assert recipe.arms[0].train["head"] == "classifier" and "head" not in (recipe.arms[1].train or {})


@pytest.mark.parametrize("name, head", [("nsmc_binary.yaml", "classifier"), ("nsmc_stars.yaml", "classifier"),
                                        ("banking77_full.yaml", "classifier"),
                                        ("price_amazon.yaml", "regression"),
                                        ("korquad_extractive.yaml", "span")])
def test_recipes_with_a_generative_an_llm_head_and_an_encoder_head_arm(name, head):
    """Each of these compares generative LLM, LLM + head and encoder + head arms in one report; every arm
    validates as a full recipe (a head that does not fit the task, or an encoder asked to generate, fails)."""
    from tunesmith.config import arm_recipe
    from tunesmith.models.encoders import ENCODERS

    recipe = load_recipe(EXAMPLES[0].parent / name, check_files=False)
    arms = [arm_recipe(recipe, a) for a in recipe.arms]
    kinds = {(a.model.name in ENCODERS, a.train.head) for a in arms}
    assert {(False, "generative"), (False, head), (True, head)} <= kinds, name
    assert all(a.train.adapter == "full" for a in arms if a.model.name in ENCODERS)


def test_banking77_full_trains_the_measured_method():
    """The method docs/results.md chose by measurement: LoRA + classifier head, lr 1e-3, 2 epochs, grouped;
    beside it the measured encoder arm (all-MiniLM-L6-v2 + classifier head) and the generative arm on a
    sample of the training messages (so the three kinds of arm train within the hour)."""
    from tunesmith.config import arm_recipe

    recipe = load_recipe(EXAMPLES[0].parent / "banking77_full.yaml", check_files=False)
    assert [a.name for a in recipe.arms] == ["head", "minilm-head", "generative"]
    generative = arm_recipe(recipe, recipe.arms[2])
    assert generative.train.head == "generative" and 0 < generative.train.examples < 7802
    assert recipe.arms[0].train == {"head": "classifier", "learning_rate": 1.0e-3}
    encoder = arm_recipe(recipe, recipe.arms[1])
    assert (encoder.model.name, encoder.train.head, encoder.train.adapter) == ("all-minilm-l6-v2", "classifier", "full")
    assert recipe.train.epochs == 2 and recipe.train.adapter == "lora" and recipe.train.lora.r == 16
    assert recipe.train.model_copy(update={"head": "classifier"}).grouped


NEEDS_OUTSIDE = [p for p in EXAMPLES if any("../../shared" in line.split("#")[0]
                                             for line in p.read_text(encoding="utf-8").splitlines())]


@pytest.mark.parametrize("path", NEEDS_OUTSIDE, ids=[p.name for p in NEEDS_OUTSIDE])
def test_a_recipe_needing_outside_data_says_how_to_get_it_first_and_fails_with_that(path, tmp_path):
    """Copied away from the repository its ../../shared paths do not resolve: loading fails with its first line."""
    from tunesmith.config.needed import NEEDS
    from tunesmith.errors import ConfigError

    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith(NEEDS) and "../shared/data/" in first and "github.com/" in first
    copy = tmp_path / "a" / "b" / path.name
    copy.parent.mkdir(parents=True)
    copy.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_recipe(copy)
    assert first.removeprefix("# ") in str(err.value) and "missing: " in str(err.value)
