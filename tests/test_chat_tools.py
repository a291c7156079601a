"""OpenAI chat fine-tuning data: one checker (validate, upload, worker, JSONL reader), the hermes tool
form, and conversations trained on every weight-1 assistant turn and nothing else."""

import json

import pytest

from tunesmith.data.formats.chat import check_example
from tunesmith.data.formats.chat_rows import conversation_row, last_turn_pair, read_chat_file, tokenize_conversation
from tunesmith.data.formats.tool_format import parse_tool_calls, render
from tunesmith.data.formats.validate import validate_chat, validate_dpo, validate_upload
from tunesmith.data.read.readers import read_records
from tunesmith.errors import DataError

from .conftest import write_jsonl

TOOLS = [{"type": "function", "function": {"name": "get_balance", "description": "An account's balance",
                                           "parameters": {"type": "object", "properties": {"account": {"type": "string"}}}}}]


def call(cid="call_1", name="get_balance", arguments='{"account": "savings"}'):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": arguments}}


GOOD = [
    {"messages": [{"role": "system", "content": "Bank."}, {"role": "user", "content": "hi", "name": "ann"},
                  {"role": "assistant", "content": "Hello!", "weight": 0}, {"role": "user", "content": "balance?"},
                  {"role": "assistant", "content": "Which account?", "weight": 1}]},
    {"tools": TOOLS, "parallel_tool_calls": False, "messages": [
        {"role": "user", "content": "savings balance?"}, {"role": "assistant", "tool_calls": [call()]},
        {"role": "tool", "tool_call_id": "call_1", "content": "120 EUR"},
        {"role": "assistant", "content": "You have 120 EUR."}]},
    {"tools": TOOLS, "messages": [{"role": "user", "content": "savings?"},
                                  {"role": "assistant", "content": None, "tool_calls": [call()]}]},  # ends on the call
    {"functions": [TOOLS[0]["function"]], "messages": [
        {"role": "user", "content": "savings?"},
        {"role": "assistant", "function_call": {"name": "get_balance", "arguments": '{"account": "savings"}'}},
        {"role": "function", "name": "get_balance", "content": "120"}, {"role": "assistant", "content": "120."}]},
]

BAD = [  # (example, the error kind it must get)
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]}, "invalid_weight"),
    ({"messages": [{"role": "user", "content": "x", "weight": 1}, {"role": "assistant", "content": "y"}]}, "invalid_weight"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unrecognized_role"),
    ({"messages": [{"role": "user", "content": "x", "extra": 1}, {"role": "assistant", "content": "y"}]},
     "message_unrecognized_key"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, "message_missing_key"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}, "missing_content"),
    ({"messages": [{"role": "user", "content": "x"}]}, "example_missing_assistant_message"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]},
     "no_trained_assistant_message"),
    ({"tools": TOOLS, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call()]},
                                   {"role": "user", "content": "well?"}, {"role": "assistant", "content": "y"}]},
     "tool_call_without_tool_message"),
    ({"tools": TOOLS, "messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c9", "content": "1"},
                                   {"role": "assistant", "content": "y"}]}, "tool_message_without_tool_call"),
    ({"tools": TOOLS, "messages": [{"role": "user", "content": "x"},
                                   {"role": "assistant", "tool_calls": [call(name="wire_money")]}]}, "unknown_function"),
    ({"tools": TOOLS, "messages": [{"role": "user", "content": "x"},
                                   {"role": "assistant", "tool_calls": [call(arguments="{not json")]}]},
     "invalid_tool_call_arguments"),
    ({"tools": TOOLS, "messages": [{"role": "user", "content": "x"},
                                   {"role": "assistant", "tool_calls": [{"id": "c", "function": "f"}]}]}, "invalid_tool_calls"),
    ({"tools": [{"type": "function"}], "messages": [{"role": "user", "content": "x"},
                                                   {"role": "assistant", "content": "y"}]}, "invalid_tools"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes", "messages": [{"role": "user", "content": "x"},
                                                                 {"role": "assistant", "content": "y"}]},
     "invalid_parallel_tool_calls"),
]


def test_openai_examples_with_turns_weights_names_and_tools_are_valid(tmp_path):
    assert [check_example(ex) for ex in GOOD] == [[]] * len(GOOD)
    v = validate_chat(write_jsonl(tmp_path / "good.jsonl", GOOD), lambda t: len(t.split()))
    assert not v.errors and v.n == len(GOOD) and len(v.tokens) == len(GOOD)
    assert v.assistant_tokens[0] == 2  # only the weight-1 turn ("Which account?") is trained
    assert validate_upload(tmp_path / "good.jsonl") == []


def test_each_bad_example_gets_openais_error_kind_and_its_line(tmp_path):
    for ex, kind in BAD:
        assert kind in check_example(ex), (kind, ex)
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD[0]] + [ex for ex, _ in BAD])
    v = validate_chat(path, lambda t: 1)
    for line, (_, kind) in enumerate(BAD, start=2):
        assert line in v.error_lines[kind], kind
    problems = validate_upload(path)
    weight = next(p for p in problems if p.startswith("invalid_weight"))
    assert weight.startswith("invalid_weight: 2 (lines 2, 3)") and "0 or 1" in weight  # says what to do


def test_the_worker_and_the_jsonl_reader_apply_the_same_rules(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD[1], BAD[8][0]])
    with pytest.raises(DataError, match="file-abc line 2: tool_call_without_tool_message"):
        read_chat_file(path, "file-abc")
    records, rejected = read_records(path, on_error="skip")
    assert len(records) == 1 and rejected[0].source.endswith(":2")
    assert "tool_call_without_tool_message" in rejected[0].reason


def test_dpo_pairs_may_carry_tools_and_calls(tmp_path):
    pair = {"input": {"tools": TOOLS, "messages": [{"role": "user", "content": "savings?"}]},
            "preferred_output": [{"role": "assistant", "tool_calls": [call()]}],
            "non_preferred_output": [{"role": "assistant", "content": "I cannot."}]}
    bad = pair | {"preferred_output": [{"role": "assistant", "tool_calls": [call(name="nope")]}]}
    v = validate_dpo(write_jsonl(tmp_path / "p.jsonl", [pair, bad]), lambda t: 1)
    assert v.error_lines == {"invalid_preferred_output": [2]}


def test_the_cli_reports_kinds_and_lines(tmp_path, cli, tiny_model_dir):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD[1], BAD[0][0]])
    code, out = cli(["data", "validate", str(path), "--tokenizer", str(tiny_model_dir)])
    assert "invalid_weight: 1 (lines 2)" in out, out


def test_hermes_form_round_trips(tiny_model):
    _, tok = tiny_model
    text = render(tok, GOOD[1]["messages"], TOOLS)
    assert '<tools>\n{"type": "function", "function": {"name": "get_balance"' in text
    assert '<tool_call>\n{"name": "get_balance", "arguments": {"account": "savings"}}\n</tool_call>' in text
    assert "<tool_response>\n120 EUR\n</tool_response>" in text
    content, calls = parse_tool_calls('Checking.\n<tool_call>\n{"name": "get_balance", "arguments": {"account": "x"}}'
                                      '\n</tool_call>')
    assert content == "Checking." and calls == [{"name": "get_balance", "arguments": {"account": "x"}}]
    assert parse_tool_calls("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    pair = last_turn_pair(conversation_row(GOOD[1]))  # what the job's evaluation compares
    assert pair["completion"][0]["content"] == "You have 120 EUR." and pair["prompt"][0]["role"] == "system"


def test_targets_are_the_weight_1_assistant_turns_only(tiny_model):
    _, tok = tiny_model
    ex = tokenize_conversation(conversation_row(GOOD[0]), tok)
    trained = tok.decode([t for t, m in zip(ex["input_ids"], ex["completion_mask"], strict=True) if m])
    assert trained.startswith("Which account?<|im_end|>") and "Hello" not in trained and "balance" not in trained
    ex = tokenize_conversation(conversation_row(GOOD[1]), tok)
    trained = tok.decode([t for t, m in zip(ex["input_ids"], ex["completion_mask"], strict=True) if m])
    assert '<tool_call>\n{"name": "get_balance"' in trained and "You have 120 EUR." in trained
    assert "120 EUR\n</tool_response>" not in trained and "savings balance" not in trained


def _train_full(tiny_model_dir, tmp_path, rows, name):
    """A full fine-tune of the tiny model on conversation rows through the one training dispatcher."""
    from contextlib import contextmanager

    from rich.console import Console

    from tunesmith.config import validate_recipe
    from tunesmith.train.jobs import TrainData, train

    @contextmanager
    def bar(_desc, _total):
        yield lambda *a, **k: None

    recipe = validate_recipe({"name": name, "output_dir": str(tmp_path), "seed": 0, "model": {"name": str(tiny_model_dir)},
                              "train": {"adapter": "full", "epochs": 12, "batch_size": 4, "learning_rate": 5e-3,
                                        "logging_steps": 5}})
    return train(recipe, TrainData(rows=rows, val_rows=[]), Console(quiet=True), bar).output_dir


def test_a_weight_0_answer_is_not_learned(tiny_model_dir, tmp_path):
    """The same conversations twice: with the first answer at weight 1 the model learns to give it; at
    weight 0 it does not (it answers with the trained turn instead)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .conftest import banking_rows

    texts = [r["text"] for r in banking_rows(("card_arrival",), 8)]

    def rows(weight):
        return [{"messages": [{"role": "user", "content": t},
                              {"role": "assistant", "content": "pin_blocked", "weight": weight},
                              {"role": "user", "content": "card"}, {"role": "assistant", "content": "age_limit"}],
                 "tools": None} for t in texts]

    answers = {}
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for weight in (1, 0):
        folder = _train_full(tiny_model_dir, tmp_path, rows(weight), f"w{weight}")
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        prompt = tok.apply_chat_template([{"role": "user", "content": texts[0]}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        answers[weight] = tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
    assert answers[1].startswith("pin_blocked"), answers
    assert "pin" not in answers[0] and answers[0].startswith("age_limit"), answers  # the trained turn's answer


def test_trained_rows_name_their_line_on_a_bad_file(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps(GOOD[0]) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2: data_type"):
        read_chat_file(tmp_path / "x.jsonl", "file-1")


def test_dpo_pairs_with_tools_train_as_hermes_text():
    from tunesmith.train.dpo import to_pair

    pair = to_pair({"input": {"tools": TOOLS, "messages": [{"role": "user", "content": "savings?"}]},
                    "preferred_output": [{"role": "assistant", "tool_calls": [call()]}],
                    "non_preferred_output": [{"role": "assistant", "content": "I cannot."}]}, "p.jsonl:1")
    assert pair["prompt"][0]["role"] == "system" and "<tools>" in pair["prompt"][0]["content"]
    assert pair["chosen"] == [{"role": "assistant", "content": '<tool_call>\n{"name": "get_balance", "arguments": '
                                                               '{"account": "savings"}}\n</tool_call>'}]
    assert pair["rejected"] == [{"role": "assistant", "content": "I cannot."}]
