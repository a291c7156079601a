"""`tunesmith run` end to end for every task kind, and arms compared side by side, on the tiny test model."""

import json

import pytest

from .conftest import banking_recipe, banking_rows, write_jsonl, write_recipe

LABELS = ("card_arrival", "pin_blocked", "age_limit")
FAST_TRAIN = {"max_steps": 4, "batch_size": 4, "learning_rate": 5e-3, "logging_steps": 2, "max_seq_length": 96}


def _run(cli, recipe):
    code, out = cli(["run", str(recipe)])
    assert code == 0, out
    return out


def _metrics(run):
    return json.loads((run / "eval" / "metrics.json").read_text())


def test_regression_run_rejects_non_numeric_targets_and_never_scores_labels(cli, tmp_path, tiny_model_dir):
    rows = [{"text": r["text"], "words": str(len(r["text"].split()))} for r in banking_rows(LABELS, 10)]
    rows[3]["words"] = "n/a"  # a target that is not a number: set aside, counted
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    doc = banking_recipe(tmp_path, tiny_model_dir, data, name="reg", seed=3, split={"train": 19, "val": 0, "test": 10},
                         data={"task": "regression", "target_field": "words", "prompt": "How many words: {text}"},
                         train=FAST_TRAIN, eval={"max_new_tokens": 4, "bootstrap": 200, "baselines": ["mean", "ridge"]})
    out = _run(cli, write_recipe(tmp_path / "r.yaml", doc))
    run = tmp_path / "runs" / "reg"
    rejected = [json.loads(line) for line in (run / "data" / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 1 and "not a number" in rejected[0]["reason"]
    assert "rejected (see data/rejected.jsonl) | 1" in (run / "report.md").read_text()
    metrics = _metrics(run)
    assert set(metrics) == {"base", "finetuned", "mean", "ridge"}
    assert all(m["n"] == 10 and "labels" not in m for m in metrics.values())
    assert metrics["base"]["scoring"] == "free generation"  # a number is never a label
    # MAE counts unparseable answers (as a prediction of 0), so Δ and the headline agree
    preds = [json.loads(x) for x in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    base = [p for p in preds if p["model"] == "base"]
    errors = [abs((p["parsed"] if p["parsed"] is not None else 0) - p["gold"]) for p in base]
    assert metrics["base"]["mae"] == pytest.approx(sum(errors) / len(errors))
    assert "MAE" in out or "mae" in out


def test_generation_run(cli, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(LABELS, 8))
    doc = banking_recipe(tmp_path, tiny_model_dir, data, name="gen", seed=3, split={"train": 16, "val": 0, "test": 8},
                         data={"task": "generation"}, train=FAST_TRAIN, eval={"max_new_tokens": 6, "bootstrap": 100})
    _run(cli, write_recipe(tmp_path / "r.yaml", doc))
    metrics = _metrics(tmp_path / "runs" / "gen")
    assert set(metrics) == {"base", "finetuned"}  # no LLM-free baseline applies to free generation
    assert all("chrf" in m and "chrf_ci95" in m for m in metrics.values())


def test_qa_run_on_a_squad_file_keeps_every_gold_answer(cli, tmp_path, tiny_model_dir):
    paragraphs = []
    for i, r in enumerate(banking_rows(LABELS, 6)):
        words = r["text"].split()
        answer = " ".join(words[:2])
        paragraphs.append({"context": r["text"], "qas": [{"id": f"q{i}", "question": f"What starts message {i}?",
                           "answers": [{"text": answer, "answer_start": 0}, {"text": words[0], "answer_start": 0}]}]})
    squad = tmp_path / "squad.json"
    articles = [{"title": f"t{k}", "paragraphs": paragraphs[k::6]} for k in range(6)]
    squad.write_text(json.dumps({"version": "1.1", "data": articles}))
    doc = {"name": "qa", "output_dir": str(tmp_path / "runs"), "seed": 1, "model": {"name": str(tiny_model_dir)},
           "data": {"path": str(squad), "task": "qa", "input_fields": ["context", "question"], "target_field": "answers",
                    "prompt": "{context}\n\nQ: {question}", "steps": [{"step": "token_length", "fields": ["context"],
                                                                         "max": 40}],
                    "split": {"train": 10, "val": 0, "test": 6, "group_field": "title"}},
           "train": FAST_TRAIN, "eval": {"max_new_tokens": 6, "stop": ["\n"], "bootstrap": 100}}
    recipe = write_recipe(tmp_path / "r.yaml", doc)
    _run(cli, recipe)
    run = tmp_path / "runs" / "qa"
    metrics = _metrics(run)
    assert set(metrics) == {"base", "finetuned"} and all("exact_match" in m for m in metrics.values())
    preds = [json.loads(x) for x in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert all(isinstance(p["gold"], list) and len(p["gold"]) == 2 for p in preds)
    # `tunesmith eval` reads the same prepared splits (steps and grouping applied) as training did
    code, out = cli(["eval", str(recipe)])
    assert code == 0, out
    test_ids = {json.loads(x)["id"] for x in (run / "data" / "test.jsonl").read_text().splitlines()}
    again = [json.loads(x) for x in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert {p["id"] for p in again} == test_ids and {p["model"] for p in again} == {"base", "finetuned"}


def test_arms_share_the_split_differ_in_training_and_are_compared_pairwise(cli, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(LABELS, 12))
    doc = banking_recipe(
        tmp_path, tiny_model_dir, data, name="arms", seed=5, split={"train": 24, "val": 0, "test": 12},
        data={"system_prompt": "Classify the message."}, train=FAST_TRAIN,
        eval={"max_new_tokens": 4, "bootstrap": 300, "baselines": ["majority", "tfidf_svm"]},
    )
    doc["arms"] = [
        {"name": "system", "description": "with the system prompt"},
        {"name": "no-system", "data": {"system_prompt": None}},
        {"name": "sorted", "data": {"order": {"by": "target"}}, "train": {"learning_rate": 1e-3}},
    ]
    recipe = write_recipe(tmp_path / "r.yaml", doc)
    out = _run(cli, recipe)
    run = tmp_path / "runs" / "arms"
    for arm in ("system", "no-system", "sorted"):
        assert (run / "arms" / arm / "train" / "adapter" / "adapter_model.safetensors").is_file()
    metrics = _metrics(run)
    assert set(metrics) == {"base", "system", "no-system", "sorted", "majority", "tfidf_svm"}
    assert len({m["n"] for m in metrics.values()}) == 1  # every contender on the same test examples
    comps = json.loads((run / "eval" / "comparisons.json").read_text())
    pairs = {(c["a"], c["b"]) for c in comps}
    assert {("system", "no-system"), ("system", "sorted"), ("no-system", "sorted")} <= pairs
    best_baseline = max(("majority", "tfidf_svm"), key=lambda b: metrics[b]["accuracy"])
    assert ("system", best_baseline) in pairs
    for c in comps:
        lo, hi = c["ci95"]
        assert lo <= c["diff"] + 1e-9 and c["diff"] - 1e-9 <= hi
        assert c["verdict"] in ("better", "worse", "no clear difference")
    # the no-system arm was asked without a system message, as it was trained
    preds = [json.loads(x) for x in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert all("system" not in p["prompt"] for p in preds if p["model"] == "no-system")
    assert all("Classify the message." in p["prompt"] for p in preds if p["model"] == "system")
    report = (run / "report.md").read_text()
    assert "## Paired differences" in report and "Training: sorted" in report
    assert "arm 3/3: sorted" in out
    # a second run resumes: finished arms are not retrained
    out = _run(cli, recipe)
    assert out.count("not retrained") == 3


def test_arm_errors_name_the_arm_and_the_key(cli, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(LABELS, 4))
    doc = banking_recipe(tmp_path, tiny_model_dir, data, name="bad", seed=1, split={"train": 8, "val": 0, "test": 4})
    doc["arms"] = [{"name": "a", "train": {"epoch": 2}}, {"name": "b", "train": {"lora": {"rank": 8}}}]
    code, out = cli(["run", str(write_recipe(tmp_path / "r.yaml", doc))])
    assert code == 2 and "2 problem(s)" in out
    assert "arms[0] (a): train.epoch: unknown key; did you mean 'train.epochs'?" in out
    assert "arms[1] (b): train.lora.rank: unknown key" in out
    doc["arms"] = [{"name": "b", "data": {"path": "elsewhere.csv"}}]
    code, out = cli(["run", str(write_recipe(tmp_path / "r.yaml", doc))])
    assert code == 2 and "arms.0.data" in out and "the split is shared" in out
    doc["arms"] = [{"name": "a"}, {"name": "a"}]
    code, out = cli(["run", str(write_recipe(tmp_path / "r.yaml", doc))])
    assert code == 2 and "repeated: ['a']" in out


def test_official_split_files_and_a_missing_one(cli, tmp_path, tiny_model_dir):
    rows = banking_rows(LABELS, 10)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:24])
    test = write_jsonl(tmp_path / "test.jsonl", rows[24:])
    doc = banking_recipe(tmp_path, tiny_model_dir, None, name="splits", seed=2, split={"val": 0},
                         train={**FAST_TRAIN, "max_steps": 1}, eval={"max_new_tokens": 2, "baselines": ["majority"],
                                                                   "bootstrap": 0})
    doc["data"].pop("path")
    doc["data"]["splits"] = {"train": str(train), "test": str(test)}
    _run(cli, write_recipe(tmp_path / "r.yaml", doc))
    run = tmp_path / "runs" / "splits"
    test_ids = [json.loads(x)["id"] for x in (run / "data" / "test.jsonl").read_text().splitlines()]
    assert len(test_ids) == 6 and all(i.startswith("test.jsonl:") for i in test_ids)
    # without a test file, a stratified 20% of the train file is held out, and the summary says so
    doc["data"]["splits"] = {"train": str(train)}
    doc["name"] = "carved"
    _run(cli, write_recipe(tmp_path / "r2.yaml", doc))
    assert "test held out from the train file (no test file given) | 5 (20%)" in (tmp_path / "runs/carved/report.md").read_text()
    doc["data"]["splits"] = {"train": str(train), "test": str(tmp_path / "official_test.jsonl")}
    doc["data"]["description"] = "the official test split of the intents data"
    code, out = cli(["run", str(write_recipe(tmp_path / "r3.yaml", doc))])
    assert code == 3 and "data.splits.test: file not found" in out and "official_test.jsonl" in out
    assert "the official test split of the intents data" in out


def test_dpo_arm_starts_from_the_sft_arm(cli, tmp_path, tiny_model_dir):
    rows = banking_rows(LABELS, 8)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": r["text"], "chosen": r["category"], "rejected": "no idea"} for r in rows[:8]])
    doc = banking_recipe(tmp_path, tiny_model_dir, data, name="sftdpo", seed=2, split={"train": 16, "val": 0, "test": 8},
                         train={**FAST_TRAIN, "max_steps": 2}, eval={"max_new_tokens": 3, "baselines": ["majority"],
                                                                     "bootstrap": 100})
    doc["arms"] = [{"name": "sft"}, {"name": "sft-dpo", "from_arm": "sft",
                                     "train": {"method": "dpo", "dpo": {"path": str(pairs)}, "learning_rate": 1e-3}}]
    _run(cli, write_recipe(tmp_path / "r.yaml", doc))
    run = tmp_path / "runs" / "sftdpo"
    assert set(_metrics(run)) == {"base", "sft", "sft-dpo", "majority"}
    import csv

    with open(run / "arms" / "sft-dpo" / "train" / "metrics.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert table and list(table[0])[:5] == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    assert all(r["train_loss"] for r in table)


def _paraphrase_run(tmp_path, tiny_model_dir, base_url, name):
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(LABELS, 8))
    doc = banking_recipe(tmp_path, tiny_model_dir, data, name=name, seed=4, split={"train": 16, "val": 0, "test": 8},
                         train={**FAST_TRAIN, "max_steps": 2}, eval={"max_new_tokens": 3, "baselines": ["majority"],
                                                                     "bootstrap": 0})
    doc["synth"] = {"task": "paraphrase", "paraphrase": {"question_field": "text", "n": 3},
                    "provider": {"kind": "openai", "base_url": base_url, "model": "stub", "api_key_env": None},
                    "max_parse_attempts": 1}
    return write_recipe(tmp_path / f"{name}.yaml", doc)


def test_synth_stage_grows_the_train_split_only_and_drops_leaks(cli, tmp_path, tiny_model_dir):
    from .chat_server import serve

    rows = banking_rows(LABELS, 8)
    held_out: list[str] = []

    def reply(content, n):
        k = next((i for i, r in enumerate(rows) if r["text"] in content), -1)
        # one fresh rewording and one copy of a held-out message: the leakage guard must drop the copy
        fresh = f"Support request number {k}: could somebody on your team please look into my banking problem?"
        return 200, json.dumps({"paraphrases": [fresh, held_out[0]]}), 0

    with serve(reply) as url:
        recipe = _paraphrase_run(tmp_path, tiny_model_dir, url, "aug")
        code, out = cli(["data", "prepare", str(recipe)])
        assert code == 0, out
        run = tmp_path / "runs" / "aug"
        held_out += [json.loads(x)["messages"][-2]["content"] for x in (run / "data/test.jsonl").read_text().splitlines()]
        out = _run(cli, recipe)
    assert "leakage guard" in out
    report = (run / "report.md").read_text()
    assert "dropped: near-duplicate of a val/test example | 16" in report
    assert "synthetic training examples added | 16" in report
    assert "training examples (set aside as too long) | 32 (0)" in report  # 16 original + 16 paraphrases
    rejected = [json.loads(x) for f in (run / "synth").glob("*/augment_rejected.jsonl") for x in open(f)]
    assert len(rejected) == 16 and all("leakage guard" in r["reason"] for r in rejected)
    assert sum(1 for _ in open(run / "data/test.jsonl")) == 8  # held-out splits are never grown


def test_synth_stage_with_no_usable_output_stops_before_training(cli, tmp_path, tiny_model_dir):
    from .chat_server import serve

    with serve(lambda content, n: (200, "...", 0)) as url:
        recipe = _paraphrase_run(tmp_path, tiny_model_dir, url, "junk")
        code, out = cli(["run", str(recipe)])
    assert code == 3, out
    assert "yielded no usable training example" in out and "replies set aside by reason" in out
    assert not (tmp_path / "runs" / "junk" / "train" / "adapter").exists()


def test_an_adapter_scores_the_same_locally_and_through_its_openai_endpoint(cli, tmp_path, tiny_model_dir, monkeypatch):
    """Each contender is asked the way it was trained: the endpoint serving the run's adapter gets the
    fine-tuned prompt (ask_as: finetuned), so its answers equal the local evaluation's."""
    from tunesmith.serve.app import ServeSettings, create_app
    from tunesmith.serve.engines.builtin import Engine

    from .conftest import running_server

    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(LABELS, 8))
    doc = banking_recipe(tmp_path, tiny_model_dir, data, name="served", seed=6, split={"train": 16, "val": 0, "test": 8},
                         data={"system_prompt": "Classify."}, train={**FAST_TRAIN, "max_steps": 6},
                         eval={"max_new_tokens": 5, "label_scoring": False, "baselines": [], "bootstrap": 0,
                               "perplexity": False})
    _run(cli, write_recipe(tmp_path / "r.yaml", doc))
    adapter = tmp_path / "runs" / "served" / "train" / "adapter"
    engine = Engine(str(tiny_model_dir), {"ft:tiny:served": adapter}, max_batch=8, wait_ms=30)
    settings = ServeSettings(model=str(tiny_model_dir), api_keys=frozenset({"k1"}), data_dir=tmp_path / "serve")
    monkeypatch.setenv("SERVE_KEY", "k1")
    with running_server(create_app(settings, engine)) as url:
        doc["eval"]["endpoints"] = [{"name": "served", "base_url": url, "model": "ft:tiny:served",
                                     "api_key_env": "SERVE_KEY", "ask_as": "finetuned", "max_retries": 0}]
        code, out = cli(["eval", str(write_recipe(tmp_path / "r.yaml", doc))])
    assert code == 0, out
    preds = [json.loads(x) for x in (tmp_path / "runs/served/eval/predictions.jsonl").read_text().splitlines()]
    local = {p["id"]: p["output"] for p in preds if p["model"] == "finetuned"}
    served = {p["id"]: p["output"] for p in preds if p["model"] == "served"}
    assert len(local) == 8 and served == local


def test_quick_run_cuts_inputs_steps_examples_and_baselines_and_says_so(cli, tmp_path, tiny_model_dir):
    """`run --quick`: inputs cut, the steps its share of the time buys (bounded) on as many examples as they read,
    a stratified sample of test examples scored by label log-likelihood only, only the baselines that load no
    model; each cut said, the plan printed with what ran so far, and a `--set` given with it wins."""
    import re

    from tunesmith.runs.quick import QUICK_EXAMPLES, QUICK_INPUT_TOKENS, QUICK_STEPS

    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(LABELS, 50))
    doc = banking_recipe(tmp_path, tiny_model_dir, data, name="quick", seed=3, split={"train": 30, "val": 0, "test": 120},
                         train={**FAST_TRAIN, "max_steps": None, "epochs": 3},
                         eval={"max_new_tokens": 4, "bootstrap": 100})
    code, out = cli(["run", str(write_recipe(tmp_path / "r.yaml", doc)), "--quick", "--set", "eval.bootstrap=50"])
    assert code == 0, out
    said = " ".join(out.split())
    for cut in (f"every input field cut to its first {QUICK_INPUT_TOKENS} tokens (text;",
                f"{QUICK_EXAMPLES} test examples are scored", "label log-likelihood only (no free generation)",
                "baselines: majority, tfidf_logreg, tfidf_svm", "so far start-up and data:"):
        assert cut in said, cut
    steps, examples = map(int, re.search(r"finetuned (\d+) steps on (\d+) examples", said).groups())
    # the steps the machine's speed now buys (a busy machine buys fewer), never past one read of the 30 examples
    assert QUICK_STEPS[0] <= steps <= 8 and examples == min(30, steps * 4), (steps, examples)
    run = tmp_path / "runs" / "quick"
    metrics = _metrics(run)
    assert set(metrics) == {"base", "finetuned", "majority", "tfidf_logreg", "tfidf_svm"}
    assert all(m["n"] == QUICK_EXAMPLES for m in metrics.values())
    assert metrics["base"]["accuracy_generate"] is None and metrics["base"]["scoring"] == "label log-likelihood"
    logged = steps - steps % FAST_TRAIN["logging_steps"]  # the trainer logs every logging_steps, not the last step
    assert int((run / "train" / "metrics.csv").read_text().splitlines()[-1].split(",")[0]) == logged
    report = (run / "report.md").read_text()
    assert f"| steps / learning rate | {steps} (train.max_steps {steps}) /" in report and "epochs /" not in report
    assert f"on {QUICK_EXAMPLES} held-out test examples (a seeded sample of the 120 in the test split)." in report


def test_the_report_counts_the_steps_that_ran_not_the_last_logged_one():
    """Seven steps logged every two: the last row is step 6, the report says 7 (the trainer's count)."""
    from types import SimpleNamespace

    from tunesmith.runs.once import length_line

    t = SimpleNamespace(max_steps=7, learning_rate=2e-4, epochs=3)
    rows = [{"step": s} for s in (2, 4, 6)]
    assert length_line(t, rows, 7)["steps / learning rate"].startswith("7 (train.max_steps 7)")
    assert length_line(t, rows)["steps / learning rate"].startswith("6 (train.max_steps 7)")  # no count: as logged


def test_quick_takes_the_free_cpu_threads_under_load_and_gives_them_back(monkeypatch, tiny_model_dir):
    """On 2 cores that other jobs keep busy, two torch threads waiting on each other make every step many times
    slower than one: --quick takes the threads the load average leaves free, says so, and restores them."""
    import os

    import torch

    from tunesmith.config import validate_recipe
    from tunesmith.runs.quick import quick_threads

    recipe = validate_recipe({"name": "q", "model": {"name": str(tiny_model_dir)}}, source="test")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(os, "getloadavg", lambda: (1.6, 1.0, 1.0))
        with quick_threads(recipe) as said:
            assert torch.get_num_threads() == 1
            assert said == ["1 of 2 CPU threads: the load average is 1.6 (other work on this machine), and threads "
                            "that wait on each other would cost more than they add"]
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 1.0, 1.0))
        with quick_threads(recipe) as said:
            assert said == [] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
