"""scripts/results_table.py: a run folder becomes a record, records become the table of docs/results.md."""

import importlib.util
import json
from pathlib import Path

import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "results_table.py"


def load_script():
    spec = importlib.util.spec_from_file_location("results_table", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_regression_run(root: Path) -> Path:
    """The files a finished `tunesmith run` leaves, with two arms and two baselines (lower MAE is better)."""
    run = root / "price"
    (run / "eval").mkdir(parents=True)
    (run / "config.resolved.yaml").write_text(yaml.safe_dump({"name": "price", "data": {"task": "regression"}}))
    metrics = {
        "base": {"n": 50, "mae": 900.0, "mae_ci95": [700.0, 1100.0]},
        "short": {"n": 50, "mae": 600.0, "mae_ci95": [500.0, 700.0]},
        "long": {"n": 50, "mae": 500.0, "mae_ci95": [400.0, 600.0]},
        "mean": {"n": 50, "mae": 800.0, "scoring": "direct prediction"},
        "tfidf_ridge": {"n": 50, "mae": 450.0, "mae_ci95": [350.0, 550.0], "scoring": "direct prediction"},
    }
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    comps = [{"a": "long", "b": "tfidf_ridge", "verdict": "no clear difference"},
             {"a": "short", "b": "tfidf_ridge", "verdict": "worse"}]
    (run / "eval" / "comparisons.json").write_text(json.dumps(comps))
    (run / "timings.json").write_text(json.dumps({"data": 2.0, "arm short": 100.0, "arm long": 250.7, "evaluate": 30.0}))
    for arm, peak in (("short", 3000.0), ("long", 4200.0)):
        (run / "arms" / arm / "train").mkdir(parents=True)
        (run / "arms" / arm / "train" / "summary.json").write_text(json.dumps({"peak_memory_mb": peak}))
    (run / "command.txt").write_text("tunesmith run examples/price.yaml\n")
    return run


def test_collect_picks_the_best_arm_and_baseline_in_the_metric_direction(tmp_path):
    rt = load_script()
    rec = rt.collect(fake_regression_run(tmp_path))
    assert rec["best_fine_tuned"] == "long" and rec["best_baseline"] == "tfidf_ridge"  # lowest MAE of each group
    assert rec["verdict"] == "no clear difference"
    assert rec["train_seconds"] == 350.7 and rec["peak_train_memory_mb"] == 4200.0  # the best arm's peak
    assert rec["contenders"]["mean"]["kind"] == "baseline" and rec["contenders"]["base"]["kind"] == "base"
    line = rt.row(rec)
    assert "long: 500.00 [400.00, 600.00]" in line and "tfidf_ridge: 450.00" in line and "351 s / 4,200 MB" in line


def test_render_rewrites_only_the_table_between_the_markers(tmp_path):
    rt = load_script()
    records = tmp_path / "records"
    rt.main(["collect", str(fake_regression_run(tmp_path)), "--out", str(records)])
    assert json.loads((records / "price.json").read_text())["command"] == "tunesmith run examples/price.yaml"
    doc = tmp_path / "results.md"
    doc.write_text(f"# Results\nintro\n{rt.START}\nold table\n{rt.END}\nprose after\n")
    rt.main(["render", "--records", str(records), "--doc", str(doc)])
    text = doc.read_text()
    assert "old table" not in text and text.startswith("# Results\nintro\n") and text.endswith("prose after\n")
    assert "| price | regression (mae, n=50) |" in text
