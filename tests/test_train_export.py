"""Export: the merged folder loads with plain transformers, stops at EOS and matches the adapter model."""

import json

import torch

from .conftest import banking_recipe, banking_rows, write_jsonl, write_recipe

LABELS = ("card_arrival", "pin_blocked", "age_limit")


def _train(cli, tmp_path, tiny_model_dir, name, **train):
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(LABELS, 14))
    recipe = write_recipe(tmp_path / f"{name}.yaml", banking_recipe(
        tmp_path, tiny_model_dir, data, name=name, seed=5, split={"train": 36, "val": 0, "test": 6},
        data={"system_prompt": "Classify."},
        train={"batch_size": 8, "logging_steps": 10, "max_seq_length": 96, "lr_scheduler": "constant"} | train))
    code, out = cli(["train", str(recipe)])
    assert code == 0, out
    return tmp_path / "runs" / name


def _prompts(tok):
    held_out = banking_rows(LABELS, 16)
    held_out = [r for r in held_out if r not in banking_rows(LABELS, 14)]
    for row in held_out:
        msgs = [{"role": "system", "content": "Classify."}, {"role": "user", "content": row["text"]}]
        yield tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def test_export_merged_matches_the_adapter_model_token_for_token(cli, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = _train(cli, tmp_path, tiny_model_dir, "lora", max_steps=12, learning_rate=1e-2)
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    code, out = cli(["export", str(run), "--merged", str(merged), "--adapter", str(adapter)])
    assert code == 0, out
    assert (merged / "model.safetensors").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert not (merged / "adapter_config.json").exists()
    tok = AutoTokenizer.from_pretrained(merged)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    gen = json.loads((merged / "generation_config.json").read_text())
    assert im_end in ([gen["eos_token_id"]] if isinstance(gen["eos_token_id"], int) else gen["eos_token_id"])

    plain = AutoModelForCausalLM.from_pretrained(merged).eval()  # plain transformers: no tunesmith, no peft
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter
    ).eval()
    for ids in _prompts(tok):
        with torch.no_grad():
            a = plain.generate(**ids, max_new_tokens=16, do_sample=False)
            b = with_adapter.generate(**ids, max_new_tokens=16, do_sample=False, eos_token_id=im_end)
        assert a.tolist() == b.tolist()


def test_export_merged_full_fine_tune_stops_at_end_of_turn(cli, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = _train(cli, tmp_path, tiny_model_dir, "full", adapter="full", max_steps=40, learning_rate=3e-3)
    code, out = cli(["export", str(run), "--adapter", str(tmp_path / "a")])
    assert code == 2 and "no adapter" in out
    code, out = cli(["export", str(run), "--merged", str(tmp_path / "merged")])
    assert code == 0, out
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    answers = []
    for ids in _prompts(tok):
        with torch.no_grad():
            new = plain.generate(**ids, max_new_tokens=24, do_sample=False)[
                0, ids["input_ids"].shape[1] :
            ].tolist()
        assert new[-1] == im_end and len(new) < 24, tok.decode(new)  # stopped by generation_config.json alone
        answers.append(tok.decode(new[:-1]))
    assert set(answers) <= set(LABELS), answers
