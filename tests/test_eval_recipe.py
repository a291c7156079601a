"""`tunesmith eval RECIPE` on the tiny random model: every contender, every output file, bad input."""

import json

from .chat_server import serve
from .conftest import banking_recipe, banking_rows, write_jsonl, write_recipe

LABELS = ("card_arrival", "pin_blocked", "age_limit")


def _recipe(tmp_path, model_dir, data_path, **sections):
    defaults = {"data": {"system_prompt": "Classify."}, "eval": {"max_new_tokens": 4, "batch_size": 4, "bootstrap": 200}}
    merged = {k: {**defaults.get(k, {}), **sections.get(k, {})} for k in defaults | sections}
    doc = banking_recipe(tmp_path, model_dir, data_path, name="ev", seed=3, split={"train": 24, "val": 0, "test": 9}, **merged)
    return write_recipe(tmp_path / "r.yaml", doc)


def test_classification_side_by_side_with_endpoint_failures_reported(cli, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(LABELS, 11))

    def endpoint(content, n):  # answers correctly from the message, fails for anything about a PIN
        if "pin" in content.split("\n\n")[0].lower():  # the message, not the label list after it
            return 500, "down", 0
        return 200, "card_arrival", 0

    with serve(endpoint) as url:
        recipe = _recipe(
            tmp_path,
            tiny_model_dir,
            data,
            eval={
                "baselines": ["majority", "tfidf_logreg", "random", "mean"],
                "endpoints": [
                    {
                        "name": "api",
                        "base_url": url,
                        "model": "m",
                        "api_key_env": None,
                        "max_retries": 1,
                        "backoff_s": 0.0,
                    }
                ],
            },
        )
        code, out = cli(["eval", str(recipe)])
    assert code == 0, out
    assert "baseline 'mean' does not apply to a classification task; skipped" in out
    ev = tmp_path / "runs" / "ev" / "eval"
    for name in (
        "metrics.json",
        "predictions.jsonl",
        "report.md",
        "report.html",
        "headline.png",
        "confusion.png",
    ):
        assert (ev / name).is_file(), name
    metrics = json.loads((ev / "metrics.json").read_text())
    assert list(metrics) == ["base", "api", "majority", "tfidf_logreg", "random"]
    for m in metrics.values():
        assert m["n"] == 9 and 0 <= m["accuracy"] <= 1 and set(m["per_class"]) == set(LABELS)
        lo, hi = m["accuracy_ci95"]
        assert lo <= m["accuracy"] <= hi
    assert "accuracy_diff_vs_base_ci95" in metrics["api"] and "perplexity" in metrics["base"]
    preds = [json.loads(line) for line in (ev / "predictions.jsonl").read_text().splitlines()]
    api = [p for p in preds if p["model"] == "api"]
    failed = [p for p in api if "error" in p]
    assert metrics["api"]["failed_calls"] == len(failed) > 0 and len(failed) < len(api)
    assert all("HTTP 500" in p["error"] and p["attempts"] == 2 and p["correct"] is False for p in failed)
    assert all(p["parsed"] == "card_arrival" for p in api if "error" not in p)
    assert {"id", "prompt", "output", "parsed", "gold", "correct"} <= set(preds[0])
    html = (ev / "report.html").read_text()
    assert html.index("<table>") < html.index("data:image/png;base64,") and "src='confusion.png'" not in html
    md = (ev / "report.md").read_text()
    assert md.splitlines()[2].startswith("| contender |") or "| contender |" in md.split("##")[0]


def test_regression_non_numeric_answers_are_unparseable(cli, tmp_path, tiny_model_dir):
    rows = [
        {"text": f"{name} model {i}", "price": str(p * (1 + i % 3))}
        for i in range(12)
        for name, p in (("usb cable", 199), ("refrigerator", 25000))
    ]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    with serve(lambda c, n: (200, "₹250" if "cable" in c else "quite expensive", 0)) as url:
        recipe = _recipe(
            tmp_path,
            tiny_model_dir,
            data,
            data={
                "target_field": "price",
                "task": "generation",
                "split": {"train": 16, "val": 0, "test": 8, "stratify": False},
            },
            eval={
                "task": "regression",
                "baselines": ["mean", "ridge", "random", "majority"],
                "log_axes": True,
                "perplexity": False,
                "endpoints": [{"name": "api", "base_url": url, "model": "m", "api_key_env": None}],
            },
        )
        code, out = cli(["eval", str(recipe)])
    assert code == 0, out
    ev = tmp_path / "runs" / "ev" / "eval"
    metrics = json.loads((ev / "metrics.json").read_text())
    assert list(metrics) == ["base", "api", "mean", "ridge", "random"]
    api = metrics["api"]
    fridges = sum(
        "refrigerator" in json.loads(line)["prompt"]
        for line in open(ev / "predictions.jsonl")
        if json.loads(line)["model"] == "api"
    )
    assert api["unparseable"] == fridges > 0 and api["n_scored"] == 8 - fridges
    assert api["hit_red"] >= fridges / 8
    assert metrics["ridge"]["mae"] < metrics["mean"]["mae"]
    assert (ev / "scatter.png").stat().st_size > 10_000


def test_qa_recipe_on_squad_file(cli, tmp_path, tiny_model_dir):
    qas = [
        {"id": f"q{i}", "question": f"What number is {i}?", "answers": [{"text": str(i), "answer_start": 0}]}
        for i in range(10)
    ]
    doc = {"data": [{"title": "t", "paragraphs": [{"context": "numbers", "qas": qas}]}]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(doc))
    with serve(lambda c, n: (200, c.split("What number is ")[1].split("?")[0] + "\nmore", 0)) as url:
        recipe = _recipe(
            tmp_path,
            tiny_model_dir,
            path,
            data={
                "input_fields": ["context", "question"],
                "target_field": "answers",
                "prompt": "{context}\n{question}",
                "split": {"train": 5, "val": 0, "test": 5},
            },
            eval={
                "task": "qa",
                "baselines": [],
                "endpoints": [{"name": "api", "base_url": url, "model": "m", "api_key_env": None}],
            },
        )
        code, out = cli(["eval", str(recipe)])
    assert code == 0, out
    metrics = json.loads((tmp_path / "runs/ev/eval/metrics.json").read_text())
    assert metrics["api"]["exact_match"] == 100.0 and metrics["api"]["f1"] == 100.0
    assert 0 <= metrics["base"]["f1"] <= 100 and metrics["api"]["f1_diff_vs_base"] > 0


def test_generation_with_pairwise_judge(cli, tmp_path, tiny_model_dir):
    rows = [{"text": f"say hello number {i}", "answer": f"hello {i}"} for i in range(12)]
    data = write_jsonl(tmp_path / "g.jsonl", rows)
    with serve(
        lambda c, n: (
            200,
            "A" if "Answer A:\nhello" in c else ("B" if "Answer B:\nhello" in c else "hello"),
            0,
        )
    ) as url:
        ep = {"base_url": url, "model": "m", "api_key_env": None}
        recipe = _recipe(
            tmp_path,
            tiny_model_dir,
            data,
            data={
                "target_field": "answer",
                "task": "generation",
                "split": {"train": 6, "val": 0, "test": 6, "stratify": False},
            },
            eval={
                "baselines": [],
                "endpoints": [{"name": "api", **ep}],
                "judge": {"endpoint": {"name": "judge", **ep}, "pair": ["api", "base"]},
            },
        )
        code, out = cli(["eval", str(recipe)])
    assert code == 0, out
    metrics = json.loads((tmp_path / "runs/ev/eval/metrics.json").read_text())
    assert metrics["api"]["judge_win_rate_vs_base"] == 1.0  # "hello" wins in both positions every time
    assert metrics["api"]["chrf"] > metrics["base"]["chrf"] and "rouge_l" in metrics["base"]


def test_empty_test_split_exits_3(cli, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(LABELS, 5))
    recipe = _recipe(tmp_path, tiny_model_dir, data, data={"split": {"train": 10, "val": 0, "test": 0}})
    code, out = cli(["eval", str(recipe)])
    assert code == 3 and "test split is empty" in out


def test_adapters_and_merged_folders_are_contenders(cli, tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.config import LoraSection
    from tunesmith.models.loading import wrap_adapter

    peft_model = wrap_adapter(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), "lora", LoraSection(r=4, alpha=8, dropout=0.0), seed=1
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter (B starts at zero, which would change nothing)
    peft_model.save_pretrained(tmp_path / "adapter")
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(LABELS, 11))
    recipe = _recipe(
        tmp_path,
        tiny_model_dir,
        data,
        eval={
            "baselines": [],
            "perplexity": False,
            "bootstrap": 0,
            "base_prompt_with_labels": False,
            "adapters": [
                {"name": "lora", "path": str(tmp_path / "adapter")},
                {"name": "merged", "path": str(tiny_model_dir)},
            ],
        },
    )
    code, out = cli(["eval", str(recipe)])
    assert code == 0, out
    ev = tmp_path / "runs" / "ev" / "eval"
    assert list(json.loads((ev / "metrics.json").read_text())) == ["base", "lora", "merged"]
    rows = [json.loads(line) for line in (ev / "predictions.jsonl").read_text().splitlines()]
    by = {
        m: [(r["id"], r["output"], r["parsed"]) for r in rows if r["model"] == m]
        for m in ("base", "lora", "merged")
    }
    assert by["merged"] == by["base"]  # same weights, same prompts: same answers
    assert by["lora"] != by["base"]


def test_missing_endpoint_key_exits_2_before_any_model_work(cli, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("TS_NO_SUCH_KEY", raising=False)
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(LABELS, 5))
    ep = {
        "name": "hosted",
        "base_url": "http://127.0.0.1:9/v1",
        "model": "m",
        "api_key_env": "TS_NO_SUCH_KEY",
    }
    recipe = _recipe(
        tmp_path,
        tmp_path / "no-model-here",
        data,
        data={"split": {"train": 5, "val": 0, "test": 5}},
        eval={"endpoints": [ep]},
    )
    code, out = cli(["eval", str(recipe)])
    assert code == 2 and "TS_NO_SUCH_KEY" in out


def test_max_examples_samples_a_sorted_test_file_across_its_labels(cli, tmp_path, tiny_model_dir):
    """An official test file sorted by label: the first 12 rows hold 2 labels; the seeded stratified sample
    holds every label in its share. ``data.split: {train: 0.9, val: 0.1}`` beside a test file is accepted:
    only the shares carved out of the train file are counted."""
    from collections import Counter

    labels = ("card_arrival", "pin_blocked", "age_limit", "exchange_rate")
    rows = banking_rows(labels, 20)
    train = write_jsonl(tmp_path / "train.jsonl", [r for i, r in enumerate(rows) if i % 20 < 10])
    test = write_jsonl(tmp_path / "test.jsonl", [r for i, r in enumerate(rows) if i % 20 >= 10])  # sorted by label
    assert Counter(r["category"] for r in [json.loads(x) for x in test.read_text().splitlines()][:12]) == {
        "card_arrival": 10, "pin_blocked": 2}
    recipe = _recipe(tmp_path, tiny_model_dir, train,
                     data={"path": None, "splits": {"train": str(train), "test": str(test)},
                           "split": {"train": 0.9, "val": 0.1}},
                     eval={"max_examples": 12, "baselines": ["majority"], "perplexity": False, "bootstrap": 0})
    code, out = cli(["eval", str(recipe)])
    assert code == 0, out
    ev = tmp_path / "runs" / "ev" / "eval"
    preds = [json.loads(line) for line in (ev / "predictions.jsonl").read_text().splitlines()]
    base = [p for p in preds if p["model"] == "base"]
    assert Counter(p["gold"] for p in base) == dict.fromkeys(labels, 3)
    assert [p["id"] for p in base] == [p["id"] for p in preds if p["model"] == "majority"]  # the same sample
    assert "| test examples scored | 12 of 40, stratified by label, seed 3 |" in (ev / "report.md").read_text()
    assert "| val | 4 |" in (ev / "report.md").read_text()  # 0.1 of the 40 training rows carved as val


def test_sample_is_seeded_random_in_file_order_without_labels():
    from tunesmith.data.steps.split import sample_examples
    from tunesmith.records import Example

    test = [Example(f"r{i}", {"text": str(i)}, str(i)) for i in range(100)]
    a, how = sample_examples(test, 10, False, seed=7)
    assert how == "10 of 100, random, seed 7" and len(a) == 10
    assert a != test[:10] and [e.id for e in a] == sorted((e.id for e in a), key=lambda s: int(s[1:]))
    assert sample_examples(test, 10, False, seed=7)[0] == a and sample_examples(test, 10, False, seed=8)[0] != a
    assert sample_examples(test, 100, False, seed=7) == (test, "all 100") and sample_examples(test, None, True, 1)[0] == test


def test_contender_labels_say_what_was_trained():
    from tunesmith.config import validate_recipe
    from tunesmith.eval.runner import describe_arm

    def arm(**train):
        return validate_recipe({"name": "t", "train": train,
                                "data": {"path": "d.jsonl", "input_fields": ["text"], "target_field": "label"}})

    assert describe_arm(arm(head="classifier", learning_rate=1e-3), "m") == (
        "m + LoRA r=16 + classifier head, 1 epoch(s), lr 0.001")
    assert describe_arm(arm(head="classifier", adapter="full"), "m").startswith("m + full fine-tune + classifier head,")
    assert describe_arm(arm(), "m") == "m + SFT LoRA r=16, 1 epoch(s), lr 0.0002"
    assert describe_arm(arm(method="dpo", adapter="dora", dpo={"path": "p.jsonl"}), "m").startswith("m + DPO DoRA r=16,")


def test_a_contender_result_says_where_its_answers_come_from_and_a_folder_what_it_holds(tmp_path):
    import pytest

    from tunesmith.config import EvalSection
    from tunesmith.kinds import make_task, score_outputs
    from tunesmith.records import Example
    from tunesmith.scoring.result import Source
    from tunesmith.train.result import Artefact, trained_output

    task = make_task("classification", EvalSection(), ["a", "b"])
    test = [Example("1", {"text": "x"}, "a", {})]
    arm = score_outputs(task, "arm", "", "llm", test, ["x"], ["a"])  # a source's value names it too
    base = score_outputs(task, "base", "", Source.LOCAL, test, ["x"], ["b"])
    api = score_outputs(task, "api", "", Source.ENDPOINT, test, ["x"], [None], ["HTTP 500"])
    mean = score_outputs(task, "mean", "", Source.BASELINE, test, ["x"], ["b"])
    assert arm.source is Source.LOCAL and arm.is_fine_tuned and not base.is_fine_tuned
    assert api.is_endpoint and api.metrics["failed_calls"] == 1 and "failed_calls" not in arm.metrics
    assert mean.is_baseline and mean.metrics["scoring"] == "direct prediction" != arm.metrics["scoring"]
    with pytest.raises(ValueError, match="'judge' is not a valid Source"):
        score_outputs(task, "j", "", "judge", test, ["x"], ["a"])

    run = tmp_path / "run"
    assert trained_output(run) is None
    for sub, holds in (("adapter", Artefact.MODEL), ("classifier", Artefact.CLASSIFIER), ("head", Artefact.HEAD)):
        folder = tmp_path / sub
        folder.mkdir()
        (folder / {"adapter": "adapter_config.json", "classifier": "labels.json", "head": "head.json"}[sub]).write_text("{}")
        assert Artefact.of_folder(folder) is holds
    (run / "train" / "head").mkdir(parents=True)
    (run / "train" / "head" / "head.json").write_text("{}")
    assert trained_output(run) == (run / "train" / "head", Artefact.HEAD)
