"""The extraction task kind: targets built from the recipe's fields, field-level scoring, schema-constrained
local answers, per-field baselines, and a `tunesmith run` on the tiny model."""

import json

import pytest

from tunesmith.config import DataSection, EvalSection
from tunesmith.config.kinds import TargetError
from tunesmith.kinds import make_task
from tunesmith.kinds.extraction import band_names, first_object
from tunesmith.records import Example

from .conftest import banking_rows, write_jsonl, write_recipe

LABELS = ("card_arrival", "pin_blocked", "age_limit")
FIELDS = {
    "intent": {"from": "category", "values": list(LABELS)},
    "first_word": {"from": "text", "split": " ", "part": 0, "max_chars": 20},
    "length": {"from": "chars", "bins": [40, 70]},
}


def _task(fields=None, **eval_cfg):
    return make_task("extraction", EvalSection(**eval_cfg), options={"fields": fields or FIELDS})


def _ex(obj: dict) -> Example:
    return Example("x", {"text": "t"}, json.dumps(obj, separators=(",", ":")), {})


def test_targets_are_built_field_by_field_and_bad_values_say_which_field():
    task = _task()
    record = {"text": "  Where is my card?", "category": "card_arrival", "chars": "70"}
    target, _ = task.read_target(None, record)
    assert target == '{"intent":"card_arrival","first_word":"Where","length":"70 and over"}'
    assert band_names([500, 2000]) == ["under 500", "500 to 2,000", "2,000 and over"]
    with pytest.raises(TargetError, match="field 'intent': 'lost_card' is not one of its values"):
        task.read_target(None, record | {"category": "lost_card"})
    with pytest.raises(TargetError, match="field 'length': 'n/a' is not a number"):
        task.read_target(None, record | {"chars": "n/a"})
    with pytest.raises(TargetError, match="field 'intent': 'category' is missing or empty"):
        task.read_target(None, {"text": "x", "chars": 3})
    # the target field may hold the object itself (a dict in JSONL, JSON text in a CSV); its keys come first
    plain = _task({"intent": {"values": list(LABELS)}, "note": {}})
    assert plain.read_target('{"intent": "age_limit", "note": 12.0}', {})[0] == '{"intent":"age_limit","note":"12"}'


def test_field_scores_count_partial_answers_and_ignore_unknown_keys():
    task = _task()
    ex = _ex({"intent": "card_arrival", "first_word": "Where", "length": "under 40"})
    full = task.parse('Sure: {"intent": "card_arrival", "first_word": "where ", "length": "under 40", "x": 1}')
    assert full == {"intent": "card_arrival", "first_word": "where", "length": "under 40"}
    assert task.score(full, ex) == 1.0 and task.correct(full, ex)  # case and spaces folded
    part = task.parse('{"intent": "pin_blocked", "length": "under 40"}')
    assert task.score(part, ex) == pytest.approx(2 * 1 / (2 + 3)) and not task.correct(part, ex)
    assert task.parse("no object here") is None and task.score(None, ex) == 0.0
    assert first_object('```json\n{"a": {"b": 1}}\n```') == {"a": {"b": 1}}
    m = task.metrics([full, part, None], [ex, ex, ex])
    assert m["field_precision"] == pytest.approx(4 / 5) and m["field_recall"] == pytest.approx(4 / 9)
    assert m["exact_object"] == pytest.approx(1 / 3) and m["unparseable"] == 1
    assert m["field_accuracy"] == {"intent": pytest.approx(1 / 3), "first_word": pytest.approx(1 / 3),
                                   "length": pytest.approx(2 / 3)}
    assert m["field_f1"] == pytest.approx((1 + 0.4 + 0) / 3)


def test_the_recipe_checks_task_options():
    base = {"path": "d.jsonl", "input_fields": ["text"]}
    with pytest.raises(ValueError, match="fields.length: Value error, give bins or values, not both"):
        DataSection(**base, task="extraction", task_options={"fields": {"length": {"bins": [1], "values": ["a"]}}})
    with pytest.raises(ValueError, match="fields.x.colour: Extra inputs are not permitted"):
        DataSection(**base, task="extraction", task_options={"fields": {"x": {"colour": "red"}}})
    with pytest.raises(ValueError, match="bins must increase"):
        DataSection(**base, task="extraction", task_options={"fields": {"x": {"bins": [5, 2]}}})
    with pytest.raises(ValueError, match="the classification task takes no task_options"):
        DataSection(**base, target_field="category", task_options={"fields": {}})
    with pytest.raises(ValueError, match="target_field: required for a classification task"):
        DataSection(**base)
    assert DataSection(**base, task="extraction", task_options={"fields": FIELDS}).target_field is None


def test_the_schema_keeps_closed_fields_closed():
    schema = _task().json_schema()
    assert schema["properties"]["intent"] == {"enum": list(LABELS)}
    assert schema["properties"]["length"] == {"enum": ["under 40", "40 to 70", "70 and over"]}
    assert schema["properties"]["first_word"] == {"type": "string", "maxLength": 20}
    assert schema["required"] == list(FIELDS) and schema["additionalProperties"] is False


def test_extraction_run_answers_under_the_schema_and_beats_nothing_silently(cli, tmp_path, tiny_model_dir):
    rows = [{"text": r["text"], "category": r["category"], "chars": len(r["text"])} for r in banking_rows(LABELS, 10)]
    rows[4]["category"] = "lost_card"  # not one of the intent's values: set aside with the reason, counted
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    doc = {"name": "ext", "output_dir": str(tmp_path / "runs"), "seed": 3, "model": {"name": str(tiny_model_dir)},
           "data": {"path": str(data), "task": "extraction", "input_fields": ["text"], "task_options": {"fields": FIELDS},
                    "system_prompt": "Answer with the message's intent, first word and length as JSON.",
                    "split": {"train": 19, "val": 0, "test": 10}},
           "train": {"max_steps": 3, "batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1, "max_seq_length": 256},
           "eval": {"max_new_tokens": 8, "bootstrap": 100, "baselines": ["majority", "tfidf_fields"]}}
    code, out = cli(["run", str(write_recipe(tmp_path / "r.yaml", doc))])
    assert code == 0, out
    run = tmp_path / "runs" / "ext"
    rejected = [json.loads(line) for line in (run / "data" / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 1 and "'lost_card' is not one of its values" in rejected[0]["reason"]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"base", "finetuned", "majority", "tfidf_fields"}
    assert all(m["n"] == 10 and "field_f1_ci95" in m for m in metrics.values())
    preds = [json.loads(x) for x in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    for p in (p for p in preds if p["model"] in ("base", "finetuned")):
        # a random 2-layer model still answers a complete object with values from the closed sets
        obj = json.loads(p["output"])
        assert list(obj) == list(FIELDS) and obj["intent"] in LABELS, p["output"]
        assert obj["length"] in band_names([40, 70]) and len(obj["first_word"]) <= 20
    assert metrics["base"]["unparseable"] == 0 and metrics["base"]["scoring"] == "schema-constrained generation"
    majority = [p for p in preds if p["model"] == "majority"]
    assert len({json.dumps(p["parsed"]) for p in majority}) == 1  # one object for every message
    report = (run / "report.md").read_text()
    assert "exact object" in report and "intent accuracy" in report and "fields.png" in report
