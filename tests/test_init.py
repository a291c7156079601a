"""`tunesmith init DATA`: a recipe fitted to the data that loads, fits the machine and runs unedited; and
`train.max_seq_length: auto`, which cuts long inputs instead of dropping examples."""

from __future__ import annotations

import csv
import json
import re

import pytest
import yaml

import tunesmith.kinds  # noqa: F401 - registers the task kinds recipes are checked against
from tests.conftest import banking_rows, write_jsonl
from tunesmith.config import load_recipe

LABELS = ("card_arrival", "pin_blocked", "age_limit", "exchange_rate")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Recipes write their runs under ./runs: each test in its own folder."""
    monkeypatch.chdir(tmp_path)


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def init(cli, tmp_path, data, *extra, model=None):
    out = tmp_path / "recipe.yaml"
    args = ["init", str(data), "--out", str(out), *extra] + (["--model", str(model)] if model else [])
    code, text = cli(args)
    assert code == 0, text
    return out, text


def fits(cli, recipe) -> str:
    code, text = cli(["train", str(recipe), "--estimate"])
    assert code == 0, text
    assert "fits in" in text, text
    return text


def test_init_on_a_labelled_csv_writes_a_recipe_that_fits_and_runs_unedited(cli, tmp_path, tiny_model_dir,
                                                                            tiny_bert_dir):
    rows = [{"id": str(i), "text": r["text"], "category": r["category"]}
            for i, r in enumerate(banking_rows(LABELS, 10))]
    data = write_csv(tmp_path / "tickets.csv", rows)
    recipe, said = init(cli, tmp_path, data, "--encoder", str(tiny_bert_dir), model=tiny_model_dir)
    assert "task: classification" in said and "target: category" in said and "input: text" in said
    assert "id: number" in said  # the fields are shown; the id column is not an input
    assert f"Next: tunesmith run {recipe}" in said
    cfg = load_recipe(recipe)
    assert cfg.data.task == "classification" and cfg.data.input_fields == ["text"]
    assert cfg.train.max_seq_length == "auto" and cfg.train.epochs == 3  # 28 examples: the cookbook's rule
    assert [a.name for a in cfg.arms] == ["encoder-head", "llm-lora"]  # a CPU: an encoder head beside the LLM
    text = recipe.read_text()
    assert "# the OpenAI cookbook's rule for 28 training examples" in text and "# the memory estimator" in text
    estimate = fits(cli, recipe)
    for row in ("encoder-head", "llm-lora", "evaluation", "total"):  # time and memory for every arm and the eval
        assert re.search(rf"^  {row} .*(\d+ (s|min))", estimate, re.MULTILINE), estimate
    code, out = cli(["run", str(recipe), "--set", "train.max_steps=2", "--set", "eval.baselines=[majority]"])
    assert code == 0, out
    assert "Time and memory to expect for tickets" in out  # printed before the run starts
    run = tmp_path / "runs" / "tickets"
    report = (run / "report.md").read_text()
    assert "## Paired differences" in report and "encoder-head" in report and "llm-lora" in report
    assert "2 steps" in report and "epoch(s)" not in report  # max_steps replaced the epochs
    resolved = yaml.safe_load((run / "arms" / "llm-lora" / "config.resolved.yaml").read_text())
    assert isinstance(resolved["train"]["max_seq_length"], int)
    assert "99th percentile" in resolved["_chosen"]["train.max_seq_length"]


def test_init_on_a_numeric_target_is_regression(cli, tmp_path, tiny_model_dir):
    rows = [{"text": r["text"], "price": f"{10 + 3.7 * i:.2f}"} for i, r in enumerate(banking_rows(LABELS, 10))]
    recipe, said = init(cli, tmp_path, write_jsonl(tmp_path / "prices.jsonl", rows), "--target", "price",
                        "--encoder", "none", model=tiny_model_dir)
    assert "task: regression ('price' holds numbers with 40 distinct values;" in said
    cfg = load_recipe(recipe)
    assert cfg.data.task == "regression" and [a.name for a in cfg.arms] == ["llm-lora"]
    fits(cli, recipe)


def test_init_on_a_squad_file_is_qa(cli, tmp_path, tiny_model_dir):
    paragraphs = [{"context": f"The card number {i} arrives in {i + 2} days by post.",
                   "qas": [{"id": f"q{i}", "question": f"When does card {i} arrive?",
                            "answers": [{"text": f"{i + 2} days", "answer_start": 24}]}]} for i in range(30)]
    doc = {"data": [{"title": f"t{i % 6}", "paragraphs": paragraphs[i::6]} for i in range(6)]}
    data = tmp_path / "squad.json"
    data.write_text(json.dumps(doc), encoding="utf-8")
    recipe, said = init(cli, tmp_path, data, "--encoder", "none", model=tiny_model_dir)
    assert "task: qa (a SQuAD-style file" in said
    cfg = load_recipe(recipe)
    assert cfg.data.task == "qa" and cfg.data.split.group_field == "title"
    fits(cli, recipe)


def test_init_on_chat_jsonl_is_generation_with_the_shared_system_prompt(cli, tmp_path, tiny_model_dir):
    rows = [{"messages": [{"role": "system", "content": "You are a bank assistant."},
                          {"role": "user", "content": r["text"]},
                          {"role": "assistant", "content": f"This is about {r['category'].replace('_', ' ')}."}]}
            for r in banking_rows(LABELS, 8)]
    recipe, said = init(cli, tmp_path, write_jsonl(tmp_path / "chats.jsonl", rows), model=tiny_model_dir)
    assert "task: generation (chat JSONL" in said
    cfg = load_recipe(recipe)
    assert cfg.data.task == "generation" and cfg.data.system_prompt == "You are a bank assistant."
    pairs = [json.loads(x) for x in (tmp_path / "recipe.pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 32 and pairs[0]["completion"].startswith("This is about")
    fits(cli, recipe)


def test_init_says_which_field_it_needs_when_it_cannot_tell(cli, tmp_path):
    rows = [{"a": f"some text {i}", "b": f"other text {i}"} for i in range(30)]
    code, out = cli(["init", str(write_jsonl(tmp_path / "x.jsonl", rows)), "--out", str(tmp_path / "r.yaml")])
    assert code == 2 and "Give --target FIELD (fields: a, b)" in out


def test_auto_length_cuts_long_inputs_and_drops_nothing(tiny_model_dir):
    from rich.console import Console

    from tunesmith.config import validate_recipe
    from tunesmith.models.loading import load_tokenizer
    from tunesmith.records import Example
    from tunesmith.runs.fitting import fit_to_data, token_length

    recipe = validate_recipe({"name": "x", "model": {"name": str(tiny_model_dir)},
                              "data": {"path": "d.csv", "input_fields": ["text"], "target_field": "category"},
                              "train": {"max_seq_length": "auto"}})
    rows = banking_rows(LABELS, 25)
    train = [Example(f"e{i}", {"text": r["text"]}, r["category"], {}) for i, r in enumerate(rows)]
    train[3] = Example("long", {"text": "my new card has still not arrived " * 40}, "card_arrival", {})
    fitted, cut, _, chosen = fit_to_data(recipe, train, [], Console(quiet=True))
    limit = fitted.train.max_seq_length
    tok = load_tokenizer(str(tiny_model_dir))
    assert isinstance(limit, int) and limit < token_length(recipe, tok, train[3])  # the outlier does not set it
    assert len(cut) == len(train) and [e.id for e in cut] == [e.id for e in train]  # nothing dropped
    assert token_length(fitted, tok, cut[3]) <= limit and cut[3].inputs["text"].startswith("my new card")
    assert cut[3].target == "card_arrival" and cut[0] == train[0]  # only the long input changed
    assert "99th percentile of 100" in chosen["train.max_seq_length"] and "none dropped" in chosen["train.long_inputs"]


def test_max_seq_length_is_auto_unless_given_and_an_unmeasured_auto_trains_at_512(tiny_model_dir):
    from rich.console import Console

    from tunesmith.config import validate_recipe
    from tunesmith.records import Example
    from tunesmith.runs.fitting import fit_to_data
    from tunesmith.train.jobs import decided_length

    doc = {"name": "x", "model": {"name": str(tiny_model_dir)},
           "data": {"path": "d.csv", "input_fields": ["text"], "target_field": "category"}}
    recipe = validate_recipe(doc)
    assert recipe.train.max_seq_length == "auto"  # the default fits the data
    train = [Example(f"e{i}", {"text": r["text"]}, r["category"], {}) for i, r in enumerate(banking_rows(LABELS, 5))]
    fitted, _, _, chosen = fit_to_data(recipe, train, [], Console(quiet=True))
    assert isinstance(fitted.train.max_seq_length, int) and fitted.train.max_seq_length < 128
    assert f"99th percentile of {len(train)} training examples" in chosen["train.max_seq_length"]
    assert validate_recipe({**doc, "train": {"max_seq_length": 64}}).train.max_seq_length == 64
    out = Console(record=True, width=200)
    assert decided_length(recipe, out).train.max_seq_length == 512  # a caller that did not measure
    assert "auto → 512 (not measured" in out.export_text()
    assert decided_length(fitted, Console(quiet=True)) is fitted


def test_init_with_a_test_file_holds_it_out_as_the_test_split(cli, tmp_path, tiny_model_dir):
    rows = [{"text": r["text"], "category": r["category"]} for r in banking_rows(LABELS, 10)]
    train, test = write_csv(tmp_path / "train.csv", rows[::2]), write_csv(tmp_path / "test.csv", rows[1::2])
    recipe, _ = init(cli, tmp_path, train, "--test", str(test), "--encoder", "none", model=tiny_model_dir)
    cfg = load_recipe(recipe)
    assert cfg.data.splits.train == train and cfg.data.splits.test == test and cfg.data.path is None
    assert (cfg.data.split.train, cfg.data.split.val) == (0.8, 0.2)  # validation (20% of 20 rows) from the train file
    fits(cli, recipe)


def test_init_on_real_reviews_with_a_skewed_target(cli, tmp_path, tiny_model_dir):
    """English Alexa reviews (1-5 stars, most of them 5) from ../shared/data: the stars are labels, the review
    text the input (not the date or the product variation), and the report would lead with macro-F1."""
    from pathlib import Path

    from tunesmith.config import EvalSection
    from tunesmith.eval.headline import choose
    from tunesmith.kinds import make_task
    from tunesmith.records import Example

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "reviews_en_amazon_alexa" / \
        "amazon_alexa_reviews_shared.jsonl"
    if not data.is_file():
        pytest.skip(f"shared data not found: {data}")
    recipe, said = init(cli, tmp_path, data, "--encoder", "none", model=tiny_model_dir)
    assert "target: rating (its name says so" in said and "task: classification ('rating' holds 5 distinct" in said
    cfg = load_recipe(recipe)
    assert cfg.data.input_fields == ["verified_reviews"]
    for name, why in (("row_id", "an id"), ("date", "dates"), ("variation", "a category"), ("feedback", "numbers")):
        assert f"left out {name}: {why}" in said
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    test = [Example(str(i), {}, str(r["rating"]), {}) for i, r in enumerate(rows)]
    task = make_task("classification", EvalSection(), ["1", "2", "3", "4", "5"])
    assert "macro-F1 leads the report: one label ('5') holds" in choose(task, cfg.eval.metric, test)
