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


def _pairs(n: int) -> list[dict]:
    """chosen = the true intent, rejected = another intent (a multiple-choice distractor)."""
    return [
        {
            "prompt": [{"role": "user", "content": r["text"]}],
            "chosen": [{"role": "assistant", "content": r["category"]}],
            "rejected": [{"role": "assistant", "content": LABELS[(LABELS.index(r["category"]) + 1) % 3]}],
        }
        for r in banking_rows(LABELS, n)
    ]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("precompute", [False, True])
def test_sync_free_dpo_step_equals_trls(tmp_path, tiny_model_dir, attention, precompute, monkeypatch):
    """The same micro-step through TRL's DPOTrainer and SyncFreeDPOTrainer (the 4D mask built on the device,
    completion positions found on the host and scored by tunesmith's target head, metrics kept on the device):
    equal loss, gradients and logged metrics, on a LoRA moved away from its reference."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from tunesmith.machine.masks import padded_mask_kind
    from tunesmith.train import chunked_loss as target_head
    from tunesmith.train.dpo_trainer import SyncFreeDPOTrainer

    pairs = _pairs(2)
    scored = []  # the forward passes that the target head scored (policy, and reference unless precomputed)
    score = target_head.score_targets
    monkeypatch.setattr(target_head, "score_targets", lambda *a, **k: scored.append(1) or score(*a, **k))

    def step(cls, **extra):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention)
        model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
        args = DPOConfig(output_dir=str(tmp_path / cls.__name__), per_device_train_batch_size=6, report_to=[],
                         beta=0.1, max_length=36, use_cpu=True, bf16=False, precompute_ref_log_probs=precompute)
        trainer = cls(model=model, args=args, train_dataset=Dataset.from_list(pairs),
                      processing_class=AutoTokenizer.from_pretrained(tiny_model_dir), **extra)
        with torch.no_grad():  # as after some training: the policy moves away from its reference
            for p in trainer.model.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn_like(p))
        masks = []  # the attention masks the model's forward passes get (policy and reference)
        trainer.model.get_base_model().register_forward_pre_hook(
            lambda module, args, kwargs: masks.append(kwargs["attention_mask"].dim()), with_kwargs=True)
        rows = [trainer.train_dataset[i] for i in range(6)]
        assert any(len(r["prompt_ids"]) + len(r[side]) > 36 for r in rows for side in ("chosen_ids", "rejected_ids"))
        batch = trainer.data_collator(rows)
        trainer.model.train()
        scored.clear()
        loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
        loss.backward()
        grads = [p.grad.clone() for p in trainer.model.parameters() if p.requires_grad]
        trainer.log({})
        return batch, loss.item(), grads, trainer.state.log_history[-1], masks

    trl_batch, trl_loss, trl_grads, trl_log, trl_masks = step(DPOTrainer)
    assert not scored
    mask = padded_mask_kind(AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention))
    assert mask == {"sdpa": "bool", "eager": "float"}[attention]
    batch, loss, grads, log, masks = step(SyncFreeDPOTrainer, mask=mask)
    assert len(scored) == (1 if precompute else 2)
    assert batch["num_tokens"] == int(trl_batch["attention_mask"].sum())
    assert set(trl_masks) == {2} and set(masks) == {4} and len(masks) == (1 if precompute else 2)
    assert loss == pytest.approx(trl_loss, abs=1e-6)
    assert abs(trl_log["rewards/margins"]) > 1e-3 and trl_log["rewards/chosen"] != 0  # the policy is not the reference
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, trl_grads, strict=True))
    assert set(log) == set(trl_log) and log["num_tokens"] == trl_log["num_tokens"]
    for key, value in trl_log.items():
        assert log[key] == pytest.approx(value, abs=1e-5), key


@pytest.mark.parametrize("precompute", [True])  # the option; TRL computes the reference per step otherwise
def test_dpo_margin_grows(cli, tmp_path, tiny_model_dir, precompute):
    pairs = _pairs(8)
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
