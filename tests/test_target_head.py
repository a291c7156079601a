"""The chunked loss (target positions by integer index, scored in vocabulary tiles) gives what the logits loss
gives: the same loss, gradients and token accuracy, with the model's own output transform (Gemma-2's final
soft-cap, Granite's logit scaling); the patched model still generates as before."""

import pytest
import torch

from tunesmith.data.formats.chat_rows import tokenize_example
from tunesmith.machine.packing import PackedCollator
from tunesmith.train.chunked_loss import add_target_head, output_transform
from tunesmith.train.trainer import completion_loss

from .conftest import banking_rows

LABELS = ("card_arrival", "pin_blocked", "age_limit")


def _batch(tok, n=2):
    rows = banking_rows(LABELS, n)  # n per label
    feats = [tokenize_example([{"role": "user", "content": r["text"]}],
                              [{"role": "assistant", "content": r["category"]}], tok) for r in rows]
    return PackedCollator(tok.pad_token_id, pack=True, mask_kind="bool", capacity=120)(feats)


def _step(model, batch, form):
    model.zero_grad()
    loss, correct, n = completion_loss(model, dict(batch), form=form)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), int(correct), n, grads


def _assert_same_step(model, batch):
    add_target_head(model)
    loss, correct, n, grads = _step(model, batch, "logits")
    loss_c, correct_c, n_c, grads_c = _step(model, batch, "chunked")
    assert n_c == n and correct_c == correct
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    assert grads and grads.keys() == grads_c.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    return loss


def test_chunked_loss_equals_logits_loss_under_lora(tiny_model_dir):
    """A LoRA model (PEFT injects the adapters into the causal LM whose forward is patched), packed rows."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                      init_lora_weights=False))  # adapters away from zero: their gradients act
    batch = _batch(tok)
    assert batch["input_ids"].shape[0] < 6  # examples share rows
    assert torch.equal(batch["target_index"], batch["logits_mask"].flatten().nonzero().squeeze(1))
    _assert_same_step(model, batch)


def test_chunked_loss_applies_the_models_output_transform(tiny_model_dir):
    """Gemma-2 soft-caps its final logits and Granite divides them by ``logits_scaling``; the chunked loss
    applies both inside the kernel. Control: without the transform the chunked loss differs."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM, GraniteConfig, GraniteForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    small = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=tok.pad_token_id,
                 initializer_range=0.5)  # large weights: logits reach the cap
    batch = _batch(tok)
    for config in (Gemma2Config(**small, final_logit_softcapping=2.0, attn_implementation="eager"),
                   GraniteConfig(**small, logits_scaling=4.0)):
        torch.manual_seed(0)
        model = (Gemma2ForCausalLM if isinstance(config, Gemma2Config) else GraniteForCausalLM)(config)
        assert output_transform(model.config) != (None, 1.0)
        loss = _assert_same_step(model, batch)
        from tunesmith.train import chunked_loss as target_head

        plain = target_head.score_targets(model.base_model(input_ids=batch["input_ids"],
                                                           position_ids=batch["position_ids"],
                                                           attention_mask=batch["attention_mask"]).last_hidden_state,
                                          model.lm_head, batch["target_index"], batch["labels"])
        assert abs(-plain.log_probs.mean().item() - loss.item()) > 1e-3


@pytest.mark.parametrize("key,value,expected", [
    ("final_logit_softcapping", 30.0, (30.0, 1.0)), ("logit_scale", 0.5, (None, 0.5)),
    ("logits_scaling", 8.0, (None, 0.125)), (None, None, (None, 1.0))])
def test_output_transform_reads_the_config(key, value, expected):
    from transformers import LlamaConfig

    config = LlamaConfig()
    if key:
        setattr(config, key, value)
    assert output_transform(config) == expected


def test_the_patched_model_generates_as_before(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[5, 9, 13, 21]])
    before = model.generate(ids, max_new_tokens=6, do_sample=False)
    add_target_head(model)
    add_target_head(model)  # twice: patched once
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), before)
    with torch.no_grad():
        out = model(input_ids=ids, target_index=torch.tensor([0, 2]), target_labels=torch.tensor([9, 21]))
        logits = model(input_ids=ids).logits[0, [0, 2]].log_softmax(-1)
    torch.testing.assert_close(out.log_probs, logits[[0, 1], [9, 21]], rtol=1e-5, atol=1e-6)
