"""data.split.folds: k-fold cross-validation in one `tunesmith run`, every example scored once by models that
never trained on it."""

import json
from collections import Counter

import pytest

from .conftest import banking_recipe, banking_rows, write_jsonl, write_recipe

LABELS = ("card_arrival", "pin_blocked", "age_limit")


def _examples(n_per_label: int, groups: int | None = None):
    from tunesmith.records import Example

    out = []
    for i, r in enumerate(banking_rows(LABELS, n_per_label)):
        meta = {"movie": f"m{i % groups}"} if groups else {}
        out.append(Example(f"x{i}", {"text": r["text"]}, r["category"], meta))
    return out


def test_folds_test_every_example_once_keep_label_shares_and_carve_val_from_the_rest():
    from tunesmith.config import SplitSection
    from tunesmith.data.steps.split import fold_splits

    examples = _examples(20)
    folds = fold_splits(examples, SplitSection(folds=4, val=0.1), seed=3)
    assert len(folds) == 4
    tested = [e.id for f in folds for e in f["test"]]
    assert sorted(tested) == sorted(e.id for e in examples)  # each example in exactly one test fold
    for f in folds:
        ids = [{e.id for e in f[p]} for p in ("train", "val", "test")]
        assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
        assert sum(map(len, ids)) == len(examples)
        assert len(f["val"]) == round(0.1 * (len(examples) - len(f["test"])))
        assert set(Counter(e.target for e in f["test"]).values()) == {5}  # 20 per label over 4 folds: 5 each
    assert fold_splits(examples, SplitSection(folds=4, val=0.1), seed=3)[2]["test"] == folds[2]["test"]  # seeded
    for f in fold_splits(examples, SplitSection(folds=3, val=0.0), seed=1):  # as many folds as labels
        counts = Counter(e.target for e in f["test"])
        assert len(counts) == 3 and max(counts.values()) - min(counts.values()) <= 2, counts


def test_grouped_folds_keep_each_group_on_one_side_and_too_few_groups_are_refused():
    from tunesmith.config import SplitSection
    from tunesmith.data.steps.split import fold_splits
    from tunesmith.errors import DataError

    examples = _examples(10, groups=7)
    folds = fold_splits(examples, SplitSection(folds=3, val=0.0, group_field="movie", stratify=False), seed=0)
    for f in folds:
        test_groups = {e.meta["movie"] for e in f["test"]}
        assert test_groups and not test_groups & {e.meta["movie"] for e in f["train"]}
    assert sorted(e.id for f in folds for e in f["test"]) == sorted(e.id for e in examples)
    with pytest.raises(DataError, match="needs at least 8 groups"):
        fold_splits(examples, SplitSection(folds=8, group_field="movie"), seed=0)


def test_pooled_metrics_are_the_task_metrics_over_every_fold_and_contenders_must_match():
    from tunesmith.errors import DataError
    from tunesmith.eval.folds import pool_results
    from tunesmith.kinds import make_task, score_outputs
    from tunesmith.scoring.result import Source

    task = make_task("classification", None, list(LABELS))
    ex = _examples(4)
    a, b = ex[:6], ex[6:]
    guess = lambda part, right: [e.target if i < right else "age_limit" for i, e in enumerate(part)]  # noqa: E731
    fold1 = [score_outputs(task, "m", "d", Source.LOCAL, a, ["p"] * 6, guess(a, 6))]
    fold2 = [score_outputs(task, "m", "d", Source.LOCAL, b, ["p"] * 6, guess(b, 1))]
    fold1[0].metrics |= {"latency_ms": 2.0, "seconds": 3.0}
    fold2[0].metrics |= {"latency_ms": 4.0, "seconds": 5.0}
    test, [pooled] = pool_results(task, [(a, fold1), (b, fold2)])
    assert test == a + b and pooled.metrics["n"] == 12 and pooled.metrics["folds"] == 2
    whole = score_outputs(task, "m", "d", Source.LOCAL, a + b, ["p"] * 12, guess(a, 6) + guess(b, 1))
    assert pooled.metrics["accuracy"] == whole.metrics["accuracy"] and pooled.per_example == whole.per_example
    assert pooled.metrics["seconds"] == 8.0 and pooled.metrics["latency_ms"] == pytest.approx(3.0)
    assert [r["fold"] for r in pooled.predictions] == [1] * 6 + [2] * 6
    other = [score_outputs(task, "other", "d", Source.LOCAL, b, ["p"] * 6, guess(b, 1))]
    with pytest.raises(DataError, match="same contenders"):
        pool_results(task, [(a, fold1), (b, other)])


def test_run_with_folds_trains_each_arm_per_fold_and_scores_every_example_once(cli, tmp_path, tiny_bert_dir):
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(LABELS, 6))  # 18 messages
    doc = banking_recipe(tmp_path, tiny_bert_dir, data, name="cv", seed=5, split={"folds": 3, "val": 0},
                         train={"head": "classifier", "adapter": "full", "max_steps": 2, "batch_size": 6,
                                "max_seq_length": 48, "logging_steps": 1},
                         eval={"baselines": ["majority", "tfidf_logreg"], "bootstrap": 100})
    recipe = write_recipe(tmp_path / "r.yaml", doc)
    code, out = cli(["run", str(recipe)])
    assert code == 0, out
    run = tmp_path / "runs" / "cv"
    for i in (1, 2, 3):
        assert (run / "folds" / f"fold-{i}" / "train" / "classifier" / "head.json").is_file()
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"finetuned", "majority", "tfidf_logreg"}
    assert all(m["n"] == 18 and m["folds"] == 3 and m["accuracy_ci95"] for m in metrics.values())
    seconds = [json.loads((run / "folds" / f"fold-{i}" / "train" / "summary.json").read_text())["seconds"]
               for i in (1, 2, 3)]
    assert metrics["finetuned"]["train_seconds"] == pytest.approx(sum(seconds))
    preds = [json.loads(x) for x in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    mine = [p for p in preds if p["model"] == "finetuned"]
    assert sorted(p["id"] for p in mine) == sorted({p["id"] for p in preds})  # every example, once
    assert Counter(p["fold"] for p in mine) == {1: 6, 2: 6, 3: 6}
    report = (run / "report.md").read_text()
    assert "3 folds: each example tested once" in report and "Headline per fold" in report
    peaks = json.loads((run / "memory.json").read_text())
    assert {f"training: finetuned, fold {i}" for i in (1, 2, 3)} <= set(peaks)
    code, out = cli(["eval", str(recipe)])
    assert code != 0 and "one `tunesmith run`" in out
