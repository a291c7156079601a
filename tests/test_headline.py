"""The headline metric (eval.metric; macro-F1 where one label holds most of the test set) and the arm the report
recommends, chosen on the validation split."""

from __future__ import annotations

from pathlib import Path

import pytest

import tunesmith.kinds  # noqa: F401 - registers the task kinds recipes are checked against
from tunesmith.config import EvalSection
from tunesmith.errors import ConfigError
from tunesmith.eval import headline
from tunesmith.eval.report import Report, comparisons
from tunesmith.kinds import make_task, score_outputs
from tunesmith.records import Example
from tunesmith.scoring.result import Source

LABELS = ["1", "2", "3", "4", "5"]


def examples(golds: list[str]) -> list[Example]:
    return [Example(f"e{i}", {"text": f"review {i}"}, g, {}) for i, g in enumerate(golds)]


def result(task, name: str, test: list[Example], answers: list[str], source=Source.LOCAL):
    return score_outputs(task, name, name, source, test, [e.inputs["text"] for e in test], answers)


def skewed() -> list[Example]:
    return examples(["5"] * 14 + ["1", "1", "2", "3", "4", "4"])  # 70% five stars


def test_a_majority_label_makes_macro_f1_the_headline_and_says_why():
    task = make_task("classification", EvalSection(), LABELS)
    why = headline.choose(task, None, skewed())
    assert task.headline == "macro_f1" and "'5') holds 70% of the test set" in why


def test_eval_metric_chooses_and_an_unknown_one_is_refused():
    task = make_task("classification", EvalSection(), LABELS)
    assert headline.choose(task, "accuracy", skewed()) is None and task.headline == "accuracy"
    with pytest.raises(ConfigError, match="choose one of accuracy, macro_f1"):
        headline.choose(make_task("classification", EvalSection(), LABELS), "mae", skewed())
    balanced = examples(LABELS * 4)
    task = make_task("classification", EvalSection(), LABELS)
    assert headline.choose(task, None, balanced) is None and task.headline == "accuracy"


def test_macro_f1_verdict_is_decided_on_macro_f1_not_accuracy():
    """Always answering 5 ties a model that finds the rare labels on accuracy, and loses to it on macro-F1."""
    from sklearn.metrics import f1_score

    test = skewed()
    task = make_task("classification", EvalSection(), LABELS)
    headline.choose(task, None, test)
    majority = result(task, "majority", test, ["5"] * 20, Source.BASELINE)
    finder = result(task, "finetuned", test, ["5"] * 8 + ["1"] * 6 + ["1", "1", "2", "3", "4", "4"])
    assert majority.metrics["accuracy"] == finder.metrics["accuracy"] == 0.7
    stat = headline.statistic(task, finder)
    import numpy as np

    gold = [e.target for e in test]
    answers = [r["parsed"] for r in finder.predictions]
    assert stat(np.arange(20)) == pytest.approx(f1_score(gold, answers, labels=LABELS, average="macro", zero_division=0))
    comps = comparisons(task, [majority, finder], 300, 0)
    assert comps[0]["verdict"] == "better" and comps[0]["diff"] > 0.4
    report = Report("t", task, [finder, majority], {}, None, {}, comps)
    assert report.markdown(Path(".")).startswith("# t\n\nmacro-F1 leads the report")


def test_the_recommended_arm_is_chosen_on_validation_even_where_test_disagrees():
    task = make_task("classification", EvalSection(), LABELS)
    val, test = examples(LABELS * 2), examples(LABELS * 2)
    on_val = [result(task, "arm-a", val, LABELS * 2),  # arm-a: all right on validation
              result(task, "arm-b", val, ["1"] * 10)]
    on_test = [result(task, "arm-a", test, ["1"] * 10),  # ... and worse on test
               result(task, "arm-b", test, LABELS * 2)]
    chosen = headline.recommend(task, on_val)
    assert chosen[0] == "arm-a" and "chosen on the validation split" in chosen[1]
    report = Report("t", task, on_test, {}, None, {}, [], recommended=chosen)
    assert report.headline().startswith("**arm-a** accuracy 20.0%")  # the test result of the arm chosen on val
    assert "Recommended: **arm-a**" in report.lead()


def test_the_dashboard_reads_the_headline_and_the_recommended_arm_the_report_used(tmp_path):
    """A run whose report led with macro-F1 and recommended arm-a (chosen on validation) is listed that way,
    though arm-b has the higher test accuracy."""
    import json

    from tunesmith.runs.folders import run_summary

    run = tmp_path / "r"
    (run / "eval").mkdir(parents=True)
    (run / "config.resolved.yaml").write_text("name: r\ndata: {task: classification}\n", encoding="utf-8")
    metrics = {"arm-a": {"accuracy": 0.70, "macro_f1": 0.55}, "arm-b": {"accuracy": 0.80, "macro_f1": 0.30},
               "majority": {"accuracy": 0.70, "macro_f1": 0.16, "contender": "baseline"}}
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    (run / "eval" / "comparisons.json").write_text(json.dumps([{"a": "arm-a", "b": "majority", "diff": 0.39,
                                                                 "ci95": [0.2, 0.5], "verdict": "better",
                                                                 "b_is_baseline": True}]), encoding="utf-8")
    (run / "eval" / "headline.json").write_text(json.dumps({"metric": "macro_f1", "recommended": "arm-a"}),
                                                encoding="utf-8")
    summary = run_summary("r", run)
    assert summary["headline_metric"] == "macro_f1" and summary["best"]["name"] == "arm-a"
    assert summary["verdict"] == "better"


def test_a_validation_winner_inside_the_runner_up_interval_is_not_settled_and_the_rule_is_stated():
    """arm-b leads arm-a by one example of ten on validation: the interval includes no difference, so the
    report says the choice is not settled and recommends by the stated rule (the first arm in the recipe)."""
    task = make_task("classification", EvalSection(), LABELS)
    val = examples(LABELS * 2)
    wrong_once = [*LABELS * 2][:-1] + [LABELS[0] if LABELS[-1] != LABELS[0] else LABELS[1]]
    on_val = [result(task, "encoder-head", val, wrong_once), result(task, "llm-lora", val, LABELS * 2)]
    arm, why = headline.recommend(task, on_val)
    assert arm == "encoder-head" and "the choice is not settled" in why and "listed first in the recipe" in why
    far = [result(task, "encoder-head", val, ["1"] * 10), result(task, "llm-lora", val, LABELS * 2)]
    arm, why = headline.recommend(task, far)
    assert arm == "llm-lora" and "not settled" not in why  # 100% vs 20% on the same ten examples: settled
