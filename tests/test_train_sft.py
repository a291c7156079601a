"""SFT training: recipe keys, loss masking, packing without cross-contamination, the train command."""

import csv
import json
from contextlib import nullcontext

import pytest
import torch

from tunesmith.config import validate_recipe
from tunesmith.data.formats.chat_rows import tokenize_example
from tunesmith.errors import ConfigError
from tunesmith.machine.packing import PackedCollator, first_fit_decreasing
from tunesmith.train.trainer import completion_loss

from .conftest import banking_recipe, banking_rows, write_jsonl, write_recipe

LABELS = ("card_arrival", "pin_blocked", "age_limit")


def flex_on_cpu(attn: str):
    """A context in which flex attention, asked for, runs eagerly (PyTorch's reference implementation of the same
    mask and score functions) instead of compiled.

    Compiled on a CPU, flex attention is Inductor's C++ kernel, whose score product q·kᵀ is wrong where a CPU vector
    holds fewer floats than the kernel's 16-key blocks (AVX2 without AVX-512: 8). With heads at most 16 wide (the tiny
    Llama's are 16) and a key length 8 past a multiple of 16 (8, 24, 40, ...), the last block of keys takes the
    full-block path: it reads 8 keys past the last one and writes 8 scores past the block's last query row, here into
    the running maxima of its first 8 queries, whose attention then depends on what that memory held: a loss off by
    ~1e-4 relative, or NaN, from run to run (torch 2.13.0: torch/_inductor/codegen/cpp_micro_gemm.py, the N-tail
    kernel of ``CppMicroGemmFP32Vec`` with a transposed B, which came with pytorch/pytorch#147068). These tests check
    transformers' block mask, which the reference implementation applies exactly."""
    return torch.compiler.set_stance("force_eager") if attn == "flex_attention" else nullcontext()


def _conv(text, answer, system="Classify."):
    return [{"role": "system", "content": system}, {"role": "user", "content": text}], [
        {"role": "assistant", "content": answer}
    ]


def test_legacy_method_and_new_keys():
    base = {"name": "x", "data": {"path": "d.csv", "input_fields": ["text"], "target_field": "y"}}
    r = validate_recipe(base | {"train": {"method": "full"}})
    assert (r.train.method, r.train.adapter) == ("sft", "full")
    r = validate_recipe(base | {"train": {"adapter": "dora", "optimizer": "adafactor", "save_steps": 5}})
    assert r.train.adapter == "dora" and r.train.packing and not r.train.train_on_inputs
    with pytest.raises(ConfigError, match="early_stopping_patience needs eval_steps"):
        validate_recipe(base | {"train": {"early_stopping_patience": 2}})
    with pytest.raises(ConfigError, match="train.dpo.path"):
        validate_recipe({"name": "x", "train": {"method": "dpo"}})
    from rich.console import Console

    from tunesmith.runs.training import run_training

    no_data = validate_recipe({"name": "x"})  # a synth-only recipe is valid; SFT training refuses it
    with pytest.raises(ConfigError, match="data: required"):
        run_training(no_data, Console(quiet=True))


def test_loss_mask_prompt_ignored_completion_and_end_of_turn_trained(tiny_model):
    _, tok = tiny_model
    prompt, completion = _conv("my card has not arrived", "card_arrival")
    ex = tokenize_example(prompt, completion, tok)
    ids, mask = ex["input_ids"], ex["completion_mask"]
    n_prompt = len(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"])
    assert not any(mask[:n_prompt]) and all(mask[n_prompt:])
    trained_text = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert trained_text.startswith("card_arrival<|im_end|>")
    assert tok.convert_tokens_to_ids("<|im_end|>") in [t for t, m in zip(ids, mask, strict=True) if m]

    batch = PackedCollator(tok.pad_token_id)([ex])
    labels = batch["labels"].tolist()
    assert (
        labels == ids[n_prompt:]
    )  # every completion token is a target, no prompt token is (-100 equivalent)
    assert batch["logits_mask"].sum().item() == len(ids) - n_prompt

    full = tokenize_example(prompt, completion, tok, train_on_inputs=True)
    assert all(full["completion_mask"])
    assert len(PackedCollator(tok.pad_token_id)([full])["labels"]) == len(ids) - 1


def test_first_fit_rows_never_exceed_the_longest_example():
    lengths = [50, 10, 20, 30, 45, 5, 50]
    bins = first_fit_decreasing(lengths, max(lengths))
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(sum(lengths[i] for i in b) <= 50 for b in bins) and len(bins) == 5  # 210 tokens: 5 is optimal


@pytest.mark.parametrize("attn,kind,capacity", [("sdpa", "bool", None), ("eager", "float", None),
                                                ("sdpa", "none", None), ("eager", "none", None), ("sdpa", "none", 4096),
                                                ("flex_attention", "none", None)])
def test_packed_loss_equals_one_at_a_time(tiny_model_dir, attn, kind, capacity):
    """``bool``/``float``: the CPU path (the collator's 4D block mask). ``none``: the GPU path (packing by
    restarting position ids, no mask from the collator; the model builds the block mask from the position
    ids, as it does for SDPA on a GPU, and flex attention builds its block mask from them, as the GPU path
    without flash-attn does; flash-attention's variable-length kernels read the same boundaries).
    ``capacity``: the whole batch in one row, without padding (what the GPU path does under FlashAttention-2).
    Flex attention runs here forward only: PyTorch runs its backward pass only on GPUs. The GPU path's cases
    (``none``) take the GPU's chunked loss (tunesmith.train.chunked_loss), the others the CPU's logits loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    form = "chunked" if kind == "none" else "logits"
    if form == "chunked":
        from tunesmith.train.chunked_loss import add_target_head

        add_target_head(model)
    rows = sorted(banking_rows(LABELS, 20), key=lambda r: len(r["text"]))
    rows = rows[:6] + rows[-2:]  # short and long real messages, so that short ones share a row
    feats = [tokenize_example(*_conv(r["text"], r["category"]), tok) for r in rows]
    collate = PackedCollator(tok.pad_token_id, pack=True, mask_kind=kind, capacity=capacity)
    packed = collate(feats)
    assert ("attention_mask" in packed) == (kind != "none")
    if capacity:
        assert packed["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in feats))  # one row, no padding
    assert packed["input_ids"].shape[0] < len(feats)  # several examples really share rows
    with torch.no_grad(), flex_on_cpu(attn):  # one example here is 40 tokens long (flex_on_cpu says why it matters)
        loss, _, n = completion_loss(model, dict(packed), form=form)
        packed_sum = loss.item() * n
        alone = [completion_loss(model, collate([f]), form=form) for f in feats]
    alone_sum = sum(lo.item() * k for lo, _, k in alone)
    assert n == sum(k for _, _, k in alone)
    assert packed_sum == pytest.approx(alone_sum, rel=1e-5)  # a leak between packed examples moves logits by ~0.5

    # control: the same packed rows with a plain causal mask (examples see each other) give another loss
    leaky = dict(collate(feats))
    width = leaky["input_ids"].shape[1]
    causal = (
        torch.ones(width, width, dtype=torch.bool)
        .tril()[None, None]
        .expand(leaky["input_ids"].shape[0], 1, -1, -1)
    )
    if kind == "none":  # position ids that do not restart: nothing tells the model where examples end
        leaky["position_ids"] = torch.arange(width).expand_as(leaky["input_ids"])
    else:
        leaky["attention_mask"] = causal if kind == "bool" else torch.zeros(causal.shape).masked_fill(~causal, -3e38)
    with torch.no_grad(), flex_on_cpu(attn):
        leaky_loss, _, _ = completion_loss(model, leaky, form=form)
    assert abs(leaky_loss.item() * n - alone_sum) > 1e-3


def test_gemma2_packed_under_flex_equals_one_at_a_time_with_softcapping_and_sliding_window(tiny_model_dir):
    """The GPU path trains Gemma-2 (soft-capped attention logits, sliding-window layers) with flex attention and
    packing by position ids. Forward on a CPU: the packed rows' loss under flex equals each example's alone
    under eager attention (transformers' reference), with a cap and a window small enough to act; controls:
    without the cap, or without the window, the loss moves."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    from tunesmith.models.random_weights import parse, scaled_config

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = scaled_config(parse(f"random:gemma-2-2b?layers=2&hidden=64&heads=4&kv_heads=2&head_dim=16&vocab={len(tok)}"))
    cfg |= {"attn_logit_softcapping": 0.2, "sliding_window": 12, "pad_token_id": tok.pad_token_id,
            "initializer_range": 0.3}  # weights large enough that attention logits reach the cap
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(**cfg)).eval()
    rows = sorted(banking_rows(LABELS, 20), key=lambda r: len(r["text"]))
    feats = [tokenize_example(*_conv(r["text"], r["category"]), tok) for r in rows[:6] + rows[-2:]]
    assert min(len(f["input_ids"]) for f in feats) > cfg["sliding_window"]  # the window cuts every example
    collate = PackedCollator(tok.pad_token_id, pack=True, mask_kind="none")
    packed = collate(feats)
    assert packed["input_ids"].shape[0] < len(feats)

    def alone_sum(**change):  # the same weights in a model built from the changed config, eager attention
        other = Gemma2ForCausalLM(Gemma2Config(**cfg | change, attn_implementation="eager")).eval()
        other.load_state_dict(model.state_dict())
        return sum(lo.item() * k for lo, _, k in (completion_loss(other, collate([f])) for f in feats))

    with torch.no_grad(), flex_on_cpu("flex_attention"):
        model.set_attn_implementation("flex_attention")
        loss, _, n = completion_loss(model, dict(packed))
        reference = alone_sum()
        assert loss.item() * n == pytest.approx(reference, rel=1e-5)
        assert abs(alone_sum(attn_logit_softcapping=None) - reference) > 1e-3 * abs(reference)
        assert abs(alone_sum(sliding_window=4096) - reference) > 1e-3 * abs(reference)


def _recipe(tmp_path, tiny_model_dir, **train):
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(LABELS, 12))
    return write_recipe(tmp_path / "r.yaml", banking_recipe(
        tmp_path, tiny_model_dir, data, name="tiny-train", seed=3, split={"train": 24, "val": 6, "test": 6},
        data={"system_prompt": "Classify."},
        train={"max_steps": 6, "batch_size": 4, "learning_rate": 5e-3, "logging_steps": 2, "eval_steps": 3,
               "max_seq_length": 96} | train))


def test_train_command_writes_adapter_metrics_and_plot(cli, tmp_path, tiny_model_dir):
    code, out = cli(["train", str(_recipe(tmp_path, tiny_model_dir))])
    assert code == 0, out
    run = tmp_path / "runs" / "tiny-train"
    assert (run / "train/adapter/adapter_model.safetensors").is_file() and (run / "train/loss.png").is_file()
    with open(run / "train/metrics.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == [
        "step",
        "train_loss",
        "train_accuracy",
        "valid_loss",
        "valid_mean_token_accuracy",
        "tokens_per_second",
        "peak_memory_mb",
        "num_tokens",
    ]
    assert [int(r["step"]) for r in table] == [2, 3, 4, 6]
    trained = [r for r in table if r["train_loss"]]
    assert all(0 <= float(r["train_accuracy"]) <= 1 and float(r["tokens_per_second"]) > 0 for r in trained)
    assert all(float(r["peak_memory_mb"]) > 0 for r in trained)
    assert int(trained[-1]["num_tokens"]) > int(trained[0]["num_tokens"])
    path = json.loads((run / "train/summary.json").read_text())["train_path"]  # the chosen path, stated
    assert (path["device"], path["dtype"], path["packing"], path["optimizer"]) == ("cpu", "float32", "block_mask",
                                                                                "adamw_torch")
    assert path["gradient_checkpointing"] is False and path["reasons"]["dtype"].startswith("fp32")
    assert [r for r in table if r["valid_loss"]] and all(
        0 <= float(r["valid_mean_token_accuracy"]) <= 1 for r in table if r["valid_loss"]
    )
    summary = json.loads((run / "train/summary.json").read_text())
    assert summary["trainable_tensors_changed"] == summary["trainable_tensors"] > 0
    assert not (run / "eval").exists()  # train alone does not evaluate


def test_qlora_without_cuda_is_a_config_error(cli, tmp_path, tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error is for machines without it")
    code, out = cli(["train", str(_recipe(tmp_path, tiny_model_dir)), "--set", "train.adapter=qlora"])
    assert code == 2, out
    assert "qlora needs a CUDA GPU" in out and "train.adapter: lora" in out
    assert not (tmp_path / "runs" / "tiny-train" / "data").exists()  # refused before any work


def test_dora_and_full_train(cli, tmp_path, tiny_model_dir):
    code, out = cli(
        ["train", str(_recipe(tmp_path, tiny_model_dir, adapter="dora", max_steps=2, eval_steps=None))]
    )
    assert code == 0, out
    cfg = json.loads((tmp_path / "runs/tiny-train/train/adapter/adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    code, out = cli(
        ["train", str(_recipe(tmp_path, tiny_model_dir, adapter="full", max_steps=2, eval_steps=None))]
    )
    assert code == 0, out
    assert (tmp_path / "runs/tiny-train/train/model/model.safetensors").is_file()


def test_mask_kind_follows_the_attention_kernel():
    from types import SimpleNamespace

    from tunesmith.machine.masks import mask_kind

    def model(impl):
        return SimpleNamespace(config=SimpleNamespace(_attn_implementation=impl))

    kinds = [mask_kind(model(i)) for i in ("sdpa", "eager", "flash_attention_2", "kernels-community/flash-attn3", None)]
    assert kinds == ["bool", "float", "none", "none", "bool"]
