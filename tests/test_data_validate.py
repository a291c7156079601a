"""Formatters, `tunesmith data validate` (the cookbook's checks) and `tunesmith data profile`."""

from pathlib import Path

import pytest

from tunesmith.data.formats.exporters import alpaca_text, chat_row, completion_row, preference_row
from tunesmith.data.formats.validate import default_epochs, validate_chat

from .conftest import EXAMPLE_CSV, write_jsonl

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def words(text: str) -> int:
    return len(text.split())


def test_formatters():
    assert chat_row("q", "a", None) == {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    }
    assert chat_row("q", "a", "sys")["messages"][0] == {"role": "system", "content": "sys"}
    assert completion_row("Review: good ", "positive") == {
        "prompt": "Review: good\n\n###\n\n",
        "completion": " positive\n",
    }
    assert "### Input:" not in alpaca_text("Say hi", "hi")
    assert "### Input:\nBob\n\n### Response:\nhi Bob" in alpaca_text("Greet", "hi Bob", "Bob")
    row = preference_row("p", "good", "bad")
    assert row["input"]["messages"] == [{"role": "user", "content": "p"}]
    assert (
        row["preferred_output"][0]["content"] == "good" and row["non_preferred_output"][0]["content"] == "bad"
    )


def good(i: int, system: bool = True) -> dict:
    msgs = [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "an answer"}]
    return {"messages": ([{"role": "system", "content": "be brief"}] if system else []) + msgs}


def test_validate_counts_each_error_kind_and_tokens(tmp_path):
    rows = [
        good(0),
        good(1, system=False),
        ["not a dict"],
        {"messages": []},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "user", "content": "x", "extra": 1}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
    ]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with open(path, "a") as fh:
        fh.write("{broken json\n")
    v = validate_chat(path, words, limit=8)
    assert v.n == 10
    assert dict(v.errors) == {
        "data_type": 2,
        "missing_messages_list": 1,
        "message_missing_key": 1,
        "message_unrecognized_key": 1,
        "unrecognized_role": 1,
        "missing_content": 1,
        "example_missing_assistant_message": 2,
    }
    assert v.error_lines["data_type"] == [3, 10]
    assert v.missing_system == 1 and v.missing_user == 0
    # cookbook rule: 3 per message + tokens of role/content values + 3 for the reply
    assert v.tokens == [3 + (3 + 1 + 2) + (3 + 1 + 2) + (3 + 1 + 2), 3 + (3 + 1 + 2) + (3 + 1 + 2)]
    assert v.assistant_tokens == [2, 2] and v.over_limit == 2


def test_default_epochs_rule():
    assert default_epochs(10) == 10 and default_epochs(50) == 3 and default_epochs(20_000) == 1


def test_validate_cli_reports_cost_and_exit_codes(tmp_path, cli, tiny_model_dir):
    ok = write_jsonl(tmp_path / "ok.jsonl", [good(i) for i in range(40)])
    code, out = cli(
        ["data", "validate", str(ok), "--tokenizer", str(tiny_model_dir), "--price", "3", "--epochs", "2"]
    )
    assert code == 0, out
    assert "no format errors" in out and "40 examples" in out
    billable = int(out.split("billable tokens per epoch: ")[1].split()[0].replace(",", ""))
    assert billable > 40 * 12
    assert f"tokens charged for training: ~{2 * billable:,}" in out
    assert f"estimated cost: ~${2 * billable * 3 / 1e6:,.2f}" in out
    bad = write_jsonl(tmp_path / "bad.jsonl", [good(0), {"messages": [{"role": "user", "content": "q"}]}])
    code, out = cli(["data", "validate", str(bad), "--tokenizer", str(tiny_model_dir)])
    assert code == 3 and "example_missing_assistant_message: 1 (lines 2)" in out
    code, out = cli(["data", "validate", str(ok), "--model", "gpt-9"])
    assert code == 2 and "--max-tokens" in out
    code, out = cli(["data", "validate", str(tmp_path / "none.jsonl"), "--tokenizer", str(tiny_model_dir)])
    assert code == 3 and "not found" in out


def test_profile_cli_writes_report_and_plots(tmp_path, cli, tiny_model_dir):
    out = tmp_path / "prof"
    code, text = cli(
        [
            "data",
            "profile",
            str(EXAMPLE_CSV),
            "--field",
            "text",
            "--label",
            "category",
            "--out",
            str(out),
            "--model",
            str(tiny_model_dir),
            "--max-tokens",
            "20",
        ]
    )
    assert code == 0, text
    report = (out / "report.md").read_text()
    import csv

    with open(EXAMPLE_CSV, newline="", encoding="utf-8") as fh:
        n = sum(1 for _ in csv.DictReader(fh))
    assert f"records: **{n:,}**" in report
    assert "| text | tokens |" in report and "10 distinct" in report and "## Duplicates" in report
    for png in ("token_lengths.png", "labels.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.skipif(
    not (SHARED / "products_amazon_in").is_dir(), reason="../shared/data/products_amazon_in absent"
)
def test_profile_numeric_price_field_on_real_products(tmp_path, cli, tiny_model_dir):
    out = tmp_path / "prof"
    code, text = cli(
        [
            "data",
            "profile",
            str(SHARED / "products_amazon_in" / "amazon_in_products_shared.csv"),
            "--field",
            "product_name",
            "--numeric",
            "discounted_price",
            "--out",
            str(out),
            "--model",
            str(tiny_model_dir),
        ]
    )
    assert code == 0, text
    report = (out / "report.md").read_text()
    row = report.split("## Numeric field `discounted_price`")[1].splitlines()[4]
    count, not_number = row.split("|")[1:3]
    assert int(count.replace(",", "")) > 1000 and int(not_number) == 0  # "₹1,099" parses as 1099
    assert (out / "numeric_discounted_price.png").stat().st_size > 5000


def test_validate_dpo_and_completion_files(tmp_path):
    from tunesmith.data.formats.validate import validate_completion, validate_dpo

    dpo = write_jsonl(
        tmp_path / "p.jsonl",
        [
            preference_row("q one", "good", "bad", "sys"),
            {"input": {"messages": []}, "preferred_output": [], "non_preferred_output": []},
            {
                "input": {"messages": [{"role": "user", "content": "q"}]},
                "preferred_output": [{"role": "user", "content": "x"}],
                "non_preferred_output": [{"role": "assistant", "content": "y"}],
            },
            {
                "input": {"messages": [{"role": "user", "content": "q"}]},
                "preferred_output": [{"role": "assistant", "content": "a"}],
            },
        ],
    )
    v = validate_dpo(dpo, words)
    assert v.n == 4 and dict(v.errors) == {
        "missing_messages_list": 1,
        "invalid_preferred_output": 2,
        "invalid_non_preferred_output": 2,
    }
    assert v.error_lines["invalid_non_preferred_output"] == [2, 4]
    # input (system + user) and both outputs by the chat rule: 3 + 4 * 3 + (1+1) + (1+2) + (1+1) + (1+1)
    assert v.tokens == [3 + 4 * 3 + 2 + 3 + 2 + 2] and v.assistant_tokens == [2]
    comp = write_jsonl(
        tmp_path / "c.jsonl",
        [
            completion_row("p1", "yes"),
            completion_row("p1", "yes"),
            {"prompt": "p", "completion": "no space"},
            {"prompt": "p"},
            {"prompt": "p", "completion": " ", "extra": 1},
            {"prompt": "p", "completion": "  "},
        ],
    )
    v = validate_completion(comp, words)
    assert dict(v.errors) == {"missing_key": 1, "unrecognized_key": 1, "missing_content": 1}
    assert v.warnings["duplicate rows"] == 1 and v.warnings["completion does not start with a space"] == 1
    assert len(v.tokens) == 3


def test_exports_pass_their_own_validation(tmp_path, cli, tiny_model_dir, home):
    from .conftest import write_recipe

    rows = [
        {"text": f"message {i}", "category": "a" if i % 2 else "b", "chosen": "c", "rejected": "r"}
        for i in range(40)
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "name": "v",
            "output_dir": str(tmp_path / "runs"),
            "model": {"name": str(tiny_model_dir)},
            "data": {
                "path": str(data),
                "input_fields": ["text"],
                "target_field": "category",
                "profile": {"enabled": False},
                "export": [{"format": f} for f in ("openai-chat", "openai-dpo", "openai-completion")],
            },
        },
    )
    code, out = cli(["data", "prepare", str(recipe)])
    assert code == 0, out
    for fmt in ("openai-chat", "openai-dpo", "openai-completion"):
        path = tmp_path / "runs" / "v" / "data" / "export" / f"train.{fmt}.jsonl"
        code, out = cli(["data", "validate", str(path), "--format", fmt, "--tokenizer", str(tiny_model_dir)])
        assert code == 0 and "no format errors" in out, (fmt, out)
    code, out = cli(["data", "validate", str(path), "--format", "csv"])
    assert code == 2 and "openai-chat" in out
