"""CLI behaviour: exit codes and messages for config, data and unexpected errors."""

from .conftest import banking_rows, write_jsonl, write_recipe


def recipe_doc(data_path, model="smollm2-135m-instruct"):
    return {
        "name": "t",
        "output_dir": str(data_path.parent / "runs"),
        "model": {"name": str(model)},
        "data": {"path": str(data_path), "input_fields": ["text"], "target_field": "category"},
    }


def test_version(cli):
    code, out = cli(["--version"])
    assert code == 0 and "tunesmith 0.1.0" in out


def test_typo_in_recipe_exits_2_with_suggestion(cli, tmp_path):
    doc = recipe_doc(tmp_path / "d.jsonl")
    doc["train"] = {"epoch": 1}
    code, out = cli(["run", str(write_recipe(tmp_path / "r.yaml", doc))])
    assert code == 2
    assert "train.epoch: unknown key; did you mean 'train.epochs'?" in out


def test_wrong_type_exits_2_with_field_path(cli, tmp_path):
    r = write_recipe(tmp_path / "r.yaml", recipe_doc(tmp_path / "d.jsonl"))
    code, out = cli(["run", str(r), "--set", "train.batch_size=lots"])
    assert code == 2 and "train.batch_size" in out and "lots" in out


def test_missing_recipe_exits_2(cli, tmp_path):
    code, out = cli(["run", str(tmp_path / "missing.yaml")])
    assert code == 2 and "Recipe file not found" in out


def test_missing_data_file_exits_3_naming_the_path(cli, tmp_path):
    r = write_recipe(tmp_path / "r.yaml", recipe_doc(tmp_path / "nowhere.jsonl"))
    code, out = cli(["run", str(r)])
    assert code == 3
    assert "data.path: file not found" in out and "nowhere.jsonl" in out


def test_malformed_jsonl_exits_3_with_file_line_and_start(cli, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hi", "category": "x"}\n{"text": oops this is bad}\n')
    code, out = cli(["run", str(write_recipe(tmp_path / "r.yaml", recipe_doc(data)))])
    assert code == 3
    assert f"{data}:2" in out and "oops this is bad" in out
    assert "data.on_error: skip" in out


def test_row_missing_target_fails_by_default(cli, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hi", "category": "x"}, {"text": "no label"}])
    code, out = cli(["run", str(write_recipe(tmp_path / "r.yaml", recipe_doc(data)))])
    assert code == 3 and f"{data}:2: field 'category' is missing or empty" in out


def test_missing_model_names_the_pull_command(cli, tmp_path, home):
    rows = banking_rows(("card_arrival", "age_limit"), 10)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    doc = recipe_doc(data)
    doc["data"]["split"] = {"train": 10, "val": 0, "test": 4}
    code, out = cli(["run", str(write_recipe(tmp_path / "r.yaml", doc))])
    assert code == 1 and "tunesmith models pull smollm2-135m-instruct" in out


def test_unexpected_error_is_one_line_unless_debug(cli, tmp_path, monkeypatch):
    import tunesmith.runs.experiment

    def boom(*a, **k):
        raise ValueError("kaput")

    monkeypatch.setattr(tunesmith.runs.experiment, "run", boom)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "category": "x"}])
    r = str(write_recipe(tmp_path / "r.yaml", recipe_doc(data)))
    code, out = cli(["run", r])
    assert code == 1 and "unexpected error: ValueError: kaput" in out and "Traceback" not in out
    code, out = cli(["--debug", "run", r])
    assert code == 1 and "Traceback" in out


def test_models_list_shows_missing_model(cli, home):
    code, out = cli(["models", "list"])
    assert code == 0 and "not cached: smollm2-135m-instruct" in out


def test_resolved_config_written_even_on_data_error(cli, tmp_path):
    doc = recipe_doc(tmp_path / "nowhere.jsonl")
    cli(["run", str(write_recipe(tmp_path / "r.yaml", doc))])
    resolved = (tmp_path / "runs" / "t" / "config.resolved.yaml").read_text()
    assert "nowhere.jsonl" in resolved and "_versions" in resolved


def test_serve_takes_the_largest_file_it_accepts(cli, tmp_path, monkeypatch):
    """``--max-upload-mb`` (documented with the body limits) reaches the server's settings."""
    import tunesmith.serve.launch as launch

    seen = []
    monkeypatch.setattr(launch, "serve_platform", lambda settings, *a, **k: seen.append(settings))
    code, out = cli(["serve", "--model", str(tmp_path), "--data-dir", str(tmp_path / "d"), "--engine", "builtin",
                     "--max-upload-mb", "5"])
    assert code == 0, out
    assert seen[0].max_upload_mb == 5
