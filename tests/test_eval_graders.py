"""`eval.graders`: OpenAI graders as report columns with intervals and paired differences, on the tiny model."""

import json

from .chat_server import serve
from .conftest import banking_recipe, banking_rows, write_jsonl, write_recipe

LABELS = ("card_arrival", "pin_blocked", "age_limit")
EXACT = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.target}}",
         "operation": "eq"}
LENGTH = {"type": "python", "name": "short", "source": "def grade(sample, item):\n"
          "    return 1.0 if len(sample['output_text']) <= len(item['target']) else 0.0\n"}


def _recipe(tmp_path, model_dir, data, url, graders):
    doc = banking_recipe(tmp_path, model_dir, data, name="ev", seed=3, split={"train": 24, "val": 0, "test": 9},
                         data={"system_prompt": "Classify."},
                         eval={"max_new_tokens": 4, "batch_size": 4, "bootstrap": 200, "baselines": ["majority"],
                               "perplexity": False, "graders": graders,
                               "endpoints": [{"name": "api", "base_url": url, "model": "m", "api_key_env": None}]})
    return write_recipe(tmp_path / "r.yaml", doc)


def test_graders_are_report_columns_with_intervals(cli, tmp_path, tiny_model_dir):
    rows = banking_rows(LABELS, 11)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    gold = {r["text"]: r["category"] for r in rows}

    def endpoint(content, n):  # the right label for every message
        return 200, next(label for text, label in gold.items() if text in content), 0

    with serve(endpoint) as url:
        code, out = cli(["eval", str(_recipe(tmp_path, tiny_model_dir, data, url, [EXACT, LENGTH]))])
    assert code == 0, out
    ev = tmp_path / "runs" / "ev" / "eval"
    metrics = json.loads((ev / "metrics.json").read_text())
    api, majority = metrics["api"], metrics["majority"]
    assert api["grader_exact"] == api["accuracy"] == 1.0 and api["grader_short"] == 1.0
    assert majority["grader_exact"] == majority["accuracy"]  # the same exact match, computed by the grader
    lo, hi = majority["grader_exact_ci95"]
    assert lo <= majority["grader_exact"] <= hi
    assert api["grader_exact_diff_vs_base"] == api["grader_exact"] - metrics["base"]["grader_exact"]
    assert len(api["grader_exact_diff_vs_base_ci95"]) == 2 and api["grader_exact_errored"] == 0
    preds = [json.loads(line) for line in (ev / "predictions.jsonl").read_text().splitlines()]
    assert all(p["grader_exact"] == float(p["correct"]) for p in preds if p["model"] == "api")
    md = (ev / "report.md").read_text()
    assert "exact (95% CI)" in md and "short Δ vs base" in md


def test_a_bad_grader_stops_the_eval_before_any_model_runs(cli, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(LABELS, 11))
    recipe = _recipe(tmp_path, tiny_model_dir, data, "http://127.0.0.1:9/v1", [{**EXACT, "operation": "startswith"}])
    code, out = cli(["eval", str(recipe)])
    assert code == 2 and "eval.graders.0.operation" in out
    assert not (tmp_path / "runs" / "ev" / "eval" / "metrics.json").exists()
