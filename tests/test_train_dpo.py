"""DPO: preference formats, and a tiny run where the chosen/rejected margin grows."""

import json
from pathlib import Path

import pytest

from tunesmith.errors import DataError
from tunesmith.train.dpo import read_pairs

from .conftest import banking_rows, write_jsonl, write_recipe

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LABELS = ("card_arrival", "pin_blocked", "age_limit")


def test_reads_plain_openai_and_sharegpt_rows(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."},
            {
                "input": {"messages": [{"role": "user", "content": "Hi?"}]},
                "preferred_output": [{"role": "assistant", "content": "Hello."}],
                "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
            },
            {
                "conversations": [{"from": "human", "value": "Hi?"}],
                "chosen": {"from": "gpt", "value": "Hello."},
                "rejected": {"from": "gpt", "value": "Go away."},
            },
        ],
    )
    pairs = read_pairs(path)
    assert (
        pairs[0]
        == pairs[1]
        == pairs[2]
        == {
            "prompt": [{"role": "user", "content": "Hi?"}],
            "chosen": [{"role": "assistant", "content": "Hello."}],
            "rejected": [{"role": "assistant", "content": "Go away."}],
        }
    )


def test_bad_rows_name_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: missing 'rejected'"):
        read_pairs(path)
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{oops\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: not valid JSON"):
        read_pairs(path)


def test_reads_the_real_sharegpt_demo_file():
    demo = SHARED / "preference" / "llamafactory_dpo_en_demo.json"
    if not demo.is_file():
        pytest.skip(f"shared data not available at {demo}")
    pairs = read_pairs(demo)
    assert len(pairs) == 300
    assert all(p["chosen"][0]["role"] == "assistant" and p["prompt"][-1]["role"] == "user" for p in pairs)


@pytest.mark.parametrize("precompute", [True])  # the option; TRL computes the reference per step otherwise
def test_dpo_margin_grows(cli, tmp_path, tiny_model_dir, precompute):
    # chosen = the true intent, rejected = another intent (a multiple-choice distractor)
    rows = banking_rows(LABELS, 8)
    pairs = [
        {
            "prompt": [{"role": "user", "content": r["text"]}],
            "chosen": [{"role": "assistant", "content": r["category"]}],
            "rejected": [{"role": "assistant", "content": LABELS[(LABELS.index(r["category"]) + 1) % 3]}],
        }
        for r in rows
    ]
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "name": "dpo",
            "output_dir": str(tmp_path / "runs"),
            "seed": 1,
            "model": {"name": str(tiny_model_dir)},
            "train": {
                "method": "dpo",
                "max_steps": 12,
                "batch_size": 8,
                "learning_rate": 5e-3,
                "logging_steps": 1,
                "max_seq_length": 128,
                "lr_scheduler": "constant",
                "dpo": {
                    "path": str(write_jsonl(tmp_path / "pairs.jsonl", pairs)),
                    "beta": 0.1,
                    "precompute_ref_log_probs": precompute,
                },
            },
        },
    )
    code, out = cli(["train", str(recipe)])
    assert code == 0, out
    run = tmp_path / "runs" / "dpo"
    assert (run / "train/adapter/adapter_model.safetensors").is_file() and (
        run / "train/metrics.csv"
    ).is_file()
    history = json.loads((run / "train/dpo_log.json").read_text())
    margins = [h["rewards/margins"] for h in history if "rewards/margins" in h]
    assert len(margins) == 12
    assert sum(margins[-3:]) / 3 > sum(margins[:3]) / 3 + 0.01 and margins[-1] > 0, margins
