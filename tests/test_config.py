import pytest

from tunesmith.config import load_recipe, parse_overrides, validate_recipe
from tunesmith.errors import ConfigError

MINIMAL = {"name": "t", "data": {"path": "d.jsonl", "input_fields": ["text"], "target_field": "label"}}


def test_defaults_fill_every_section():
    r = validate_recipe(MINIMAL)
    assert r.model.name == "smollm2-135m-instruct"
    assert r.train.method == "sft" and r.train.adapter == "lora" and r.train.lora.r == 16
    assert r.eval.baselines == ["auto"]
    assert str(r.run_dir) == "runs/t"


def test_overrides_parse_yaml_values_and_nest():
    tree = parse_overrides(["train.epochs=2", "train.lora.r=8", "data.labels=[a, b]", "name=x"])
    assert tree == {"train": {"epochs": 2, "lora": {"r": 8}}, "data": {"labels": ["a", "b"]}, "name": "x"}


def test_override_without_equals_is_a_config_error():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["train.epochs"])


def test_all_errors_reported_at_once_with_paths_and_suggestion():
    raw = {**MINIMAL, "train": {"epoch": 2, "batch_size": "big", "lora": {"alhpa": 3}}}
    with pytest.raises(ConfigError) as exc:
        validate_recipe(raw)
    msg = str(exc.value)
    assert "3 problem(s)" in msg
    assert "train.epoch: unknown key; did you mean 'train.epochs'?" in msg
    assert "train.lora.alhpa: unknown key; did you mean 'train.lora.alpha'?" in msg
    assert "train.batch_size" in msg and "'big'" in msg


def test_prompt_template_must_use_input_fields():
    raw = {**MINIMAL, "data": {**MINIMAL["data"], "prompt": "{text} {title}"}}
    with pytest.raises(ConfigError, match="title"):
        validate_recipe(raw)


def test_split_must_be_fractions_or_counts():
    with pytest.raises(ConfigError, match="sum to"):
        validate_recipe({**MINIMAL, "data": {**MINIMAL["data"], "split": {"train": 0.8, "val": 0.2, "test": 0.2}}})
    with pytest.raises(ConfigError, match="whole counts"):
        validate_recipe({**MINIMAL, "data": {**MINIMAL["data"], "split": {"train": 100, "val": 0.5, "test": 10}}})


def test_data_path_is_relative_to_recipe_and_overrides_win(tmp_path):
    (tmp_path / "sub").mkdir()
    recipe = tmp_path / "sub" / "r.yaml"
    recipe.write_text("name: t\ndata: {path: d.jsonl, input_fields: [text], target_field: label}\ntrain: {epochs: 3}\n")
    r = load_recipe(recipe, ["train.epochs=1.5"])
    assert r.data.path == (tmp_path / "sub" / "d.jsonl").resolve()
    assert r.train.epochs == 1.5


def test_bad_yaml_and_missing_recipe(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)


def test_run_name_must_be_a_safe_folder_name():
    with pytest.raises(ConfigError, match="name"):
        validate_recipe({**MINIMAL, "name": "../escape"})


def test_unknown_keys_inside_steps_exports_and_profile_get_did_you_mean():
    doc = {**MINIMAL, "data": {**MINIMAL["data"], "steps": [{"step": "numeric_range", "field": "price"}],
                               "export": [{"format": "openai-chat", "seperator": "x"}], "profile": {"feilds": ["a"]}}}
    with pytest.raises(ConfigError) as exc:
        validate_recipe(doc)
    msg = str(exc.value)
    assert "data.steps.0.numeric_range.field: unknown key; did you mean 'data.steps.0.numeric_range.fields'?" in msg
    assert "did you mean 'data.export.0.separator'?" in msg and "did you mean 'data.profile.fields'?" in msg


def test_a_derive_template_that_needs_a_number_names_the_field_and_row(tmp_path):
    from tunesmith.config import DataSection
    from tunesmith.data.read.sources import read_source
    from tunesmith.errors import DataError

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "price": "cheap"}\n')
    cfg = DataSection(path=data, input_fields=["text"], target_field="price", derive={"p": "{price:.0f}"})
    with pytest.raises(DataError, match=r"d.jsonl:1: data.derive.p: .*needs a number"):
        read_source(cfg)


def test_length_grouping_auto_is_on_where_batches_are_not_packed():
    from tunesmith.config import TrainSection

    assert not TrainSection().grouped  # packed SFT batches carry no padding to save
    assert TrainSection(packing=False).grouped
    assert TrainSection(head="classifier").grouped  # the head never packs: random batches are mostly padding
    assert not TrainSection(head="classifier", group_by_length=False).grouped


def test_a_head_takes_qlora_and_a_cpu_refuses_it_by_name(tiny_model_dir):
    """A head on a 4-bit decoder (QLoRA) is a valid recipe; the training path refuses it where there is no CUDA GPU,
    naming the setting, before anything is loaded."""
    from tunesmith.config import TrainSection
    from tunesmith.machine.device import Capabilities, choose_path
    from tunesmith.machine.path import wishes

    assert TrainSection(head="classifier", adapter="qlora").adapter == "qlora"
    recipe = validate_recipe({**MINIMAL, "model": {"name": str(tiny_model_dir)},
                              "train": {"head": "classifier", "adapter": "qlora"}})
    with pytest.raises(ConfigError, match="train.adapter: qlora needs a CUDA GPU"):
        choose_path(Capabilities(), wishes(recipe))


def test_split_fractions_count_only_the_shares_carved():
    data = {**MINIMAL["data"], "split": {"train": 0.9, "val": 0.1}}
    with pytest.raises(ConfigError, match=r"sum to 1\.100 \(train 0\.9 \+ val 0\.1 \+ test 0\.1\)"):
        validate_recipe({**MINIMAL, "data": data})  # one file: the test share is carved too
    r = validate_recipe({**MINIMAL, "data": {**data, "splits": {"train": "a.jsonl", "test": "b.jsonl"}}})
    assert (r.data.split.train, r.data.split.val) == (0.9, 0.1)  # the test file takes no share
    validate_recipe({**MINIMAL, "data": {**MINIMAL["data"], "splits": {"train": "a.jsonl"}}})  # defaults still fit
    with pytest.raises(ConfigError, match=r"sum to 1\.200 \(train 0\.9 \+ val 0\.1 \+ test 0\.2\)"):
        validate_recipe({**MINIMAL, "data": {**data, "splits": {"train": "a.jsonl"}}})  # 0.2 held out for test


def test_set_changes_one_arm_by_name_and_keeps_the_others(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\ndata: {path: d.jsonl, input_fields: [text], target_field: label}\n"
                      "arms:\n  - {name: head, train: {head: classifier, learning_rate: 1.0e-3}}\n"
                      "  - {name: generative, train: {examples: 2000}}\n")
    r = load_recipe(recipe, ["arms.generative.train.examples=null", "arms.head.train.epochs=2"])
    assert [(a.name, a.train) for a in r.arms] == [
        ("head", {"head": "classifier", "learning_rate": 1.0e-3, "epochs": 2}), ("generative", {"examples": None})]
    with pytest.raises(ConfigError, match="no arm named 'sft'.*its arms: head, generative"):
        load_recipe(recipe, ["arms.sft.train.epochs=2"])
    with pytest.raises(ConfigError, match="give a key inside the arm"):
        load_recipe(recipe, ["arms.head=3"])
    assert [a.name for a in load_recipe(recipe, ["arms=[{name: only}]"]).arms] == ["only"]
