"""A local contender scored once is not scored again for the same model, test examples and settings: an
interrupted or repeated run picks up its finished contenders; any change that could move an answer scores anew."""

import json

from tunesmith.scoring.result import ContenderResult, Source, load_result, save_result

from .conftest import banking_recipe, banking_rows, write_jsonl, write_recipe

LABELS = ("card_arrival", "pin_blocked", "age_limit")


def test_a_saved_result_is_read_back_only_under_its_own_key(tmp_path):
    res = ContenderResult("base", "m", {"accuracy": 0.5, "n": 2}, [{"id": "a", "output": "x"}], ["x", None],
                          [1.0, 0.0], Source.LOCAL)
    path = tmp_path / "eval" / "contenders" / "base.json"
    save_result(path, "k1", res)
    assert load_result(path, "k1") == res
    assert load_result(path, "k2") is None  # another model, test sample or setting
    path.write_text(path.read_text()[:20])  # a file cut short
    assert load_result(path, "k1") is None
    assert load_result(tmp_path / "absent.json", "k1") is None


def test_eval_after_run_reuses_each_contender_and_a_changed_setting_scores_again(cli, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(LABELS, 6))
    doc = banking_recipe(tmp_path, tiny_model_dir, data, name="reuse", seed=3, split={"train": 12, "val": 0, "test": 6},
                         train={"max_steps": 2, "batch_size": 4, "max_seq_length": 64, "logging_steps": 1},
                         eval={"baselines": ["majority"], "bootstrap": 50, "max_new_tokens": 3, "perplexity": False})
    recipe = write_recipe(tmp_path / "r.yaml", doc)
    code, out = cli(["run", str(recipe)])
    assert code == 0, out
    run = tmp_path / "runs" / "reuse"
    first = json.loads((run / "eval" / "metrics.json").read_text())
    assert {p.name for p in (run / "eval" / "contenders").glob("*.json")} == {"base.json", "finetuned.json"}

    code, out = cli(["eval", str(recipe)])
    assert code == 0, out
    assert out.count("reused") == 2, out
    again = json.loads((run / "eval" / "metrics.json").read_text())
    for name in ("base", "finetuned"):
        assert again[name]["accuracy"] == first[name]["accuracy"]
        assert again[name]["seconds"] == first[name]["seconds"]  # the time it took when it was scored

    doc["eval"]["max_new_tokens"] = 4  # free generation may answer differently: both are scored again
    write_recipe(tmp_path / "r.yaml", doc)
    code, out = cli(["eval", str(recipe)])
    assert code == 0, out
    assert "reused" not in out, out
