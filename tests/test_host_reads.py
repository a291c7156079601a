"""A training step never reads a tensor's value on the host (on a GPU each read waits for the device; see
tunesmith.machine.syncs), on every path the Trainer runs: the three heads, DPO and generative SFT (its chunked loss,
packed with the collator's mask or on the variable-length attention the GPU path packs with);
generative SFT with the logits loss (``train.loss: logits``) has one read, named."""

import inspect
import json

import pytest
import torch

from tunesmith.machine.syncs import StepReads

from .conftest import banking_recipe, banking_rows, write_jsonl, write_recipe
from .test_train_heads import _price_rows, _squad

STEP = {"max_steps": 4, "batch_size": 2, "grad_accum": 2, "logging_steps": 100, "max_seq_length": 96,
        "optimizer": "adamw_torch_fused"}  # fused AdamW keeps its step counts as tensors, as on a GPU


def _recipe(tmp_path, model_dir, kind: str) -> dict:
    if kind.startswith("dpo"):
        labels = ("card_arrival", "pin_blocked")
        pairs = [{"prompt": [{"role": "user", "content": r["text"]}],
                  "chosen": [{"role": "assistant", "content": r["category"]}],
                  "rejected": [{"role": "assistant", "content": labels[1 - labels.index(r["category"])]}]}
                 for r in banking_rows(labels, 6)]
        dpo = {"path": str(write_jsonl(tmp_path / "pairs.jsonl", pairs)), "beta": 0.1,
               "precompute_ref_log_probs": kind == "dpo-precomputed"}
        return {"name": "reads", "output_dir": str(tmp_path / "runs"), "seed": 1, "model": {"name": str(model_dir)},
                "train": {**STEP, "method": "dpo", "dpo": dpo}}
    if kind == "span":
        return {"name": "reads", "output_dir": str(tmp_path / "runs"), "seed": 1, "model": {"name": str(model_dir)},
                "data": {"path": str(_squad(tmp_path)), "task": "qa", "input_fields": ["context", "question"],
                         "target_field": "answers", "prompt": "{context}\n\nQ: {question}",
                         "split": {"train": 8, "val": 0, "test": 4, "group_field": "title"}},
                "train": {**STEP, "head": "span", "max_seq_length": 40, "span_stride": 12}}
    if kind == "regression":
        data = write_jsonl(tmp_path / "d.jsonl", _price_rows())
        return banking_recipe(tmp_path, model_dir, data, name="reads", seed=1, split={"train": 26, "val": 0, "test": 10},
                              data={"task": "regression", "target_field": "price", "prompt": "{text}"},
                              train={**STEP, "head": "regression", "regression_loss": "huber"})
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(("card_arrival", "pin_blocked"), 8))
    head, _, loss = kind.partition("-")
    loss = "auto" if loss == "varlen" else loss
    return banking_recipe(tmp_path, model_dir, data, name="reads", seed=1, split={"train": 12, "val": 0, "test": 4},
                          train={**STEP, "head": head, "loss": loss or "auto"})


def test_step_reads_counts_reads_inside_steps_only_and_restores_torch():
    t = torch.tensor([1.0, 2.0])
    reads = StepReads("cpu")
    with reads:
        assert t.sum().item() == 3.0  # outside a step: not counted
        reads.active = True
        assert bool(t.all()) and t.tolist() == [1.0, 2.0] and float(t[0]) == 1.0
        t[torch.tensor([0])], t[1:], t[0]  # integer and slice indexing: sized without reading values
        t[t > 1.5], torch.nonzero(t), t.masked_select(t > 0)  # sized by the values: a GPU waits for them
        reads.active, reads.steps = False, 1
    assert len(reads.sites) == 6 and all(site.startswith(__file__ + ":") for site in reads.sites)  # the asking line
    assert reads.per_step == 6
    assert torch.Tensor.item.__qualname__ == "TensorBase.item"  # the originals are back
    assert torch.Tensor.__getitem__.__qualname__ == "TensorBase.__getitem__" and torch.nonzero.__name__ == "nonzero"


@pytest.mark.parametrize("kind", ["generative", "generative-logits", "generative-varlen", "classifier", "regression",
                                  "span", "dpo", "dpo-precomputed"])
def test_training_steps_read_nothing_from_the_device(cli, tmp_path, tiny_model_dir, monkeypatch, kind):
    import collections

    import tunesmith.train.sft as sft

    if kind == "generative-varlen":  # the GPU path's packing (tunesmith.machine.varlen), on the CPU's SDPA kernel
        from dataclasses import replace

        import tunesmith.machine.path as path_module

        choose = path_module.choose_path
        monkeypatch.setattr(path_module, "choose_path", lambda *a, **k: replace(choose(*a, **k), packing="varlen",
                                                                                 varlen="sdpa"))
    fit = sft.fit
    reads = StepReads("cpu")
    monkeypatch.setattr(sft, "fit", lambda trainer, out, resume, bar, callbacks=None: fit(
        trainer, out, resume, bar, [*(callbacks or []), reads.callback()]))
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tmp_path, tiny_model_dir, kind))
    with reads:
        code, out = cli(["train", str(recipe)])
    assert code == 0, out
    assert reads.steps == 4
    sites = collections.Counter(reads.sites)
    if kind == "generative-logits":  # the logits loss keeps target positions with a boolean mask
        from transformers.modeling_utils import slice_logits_to_keep

        lines, first = inspect.getsourcelines(slice_logits_to_keep)
        where = inspect.getsourcefile(slice_logits_to_keep)
        assert sum(sites.values()) == 8, sites  # once per micro-step
        assert all(site.rsplit(":", 1)[0] == where and first <= int(site.rsplit(":", 1)[1]) < first + len(lines)
                   for site in sites), sites
    else:
        assert not sites, sites
    summary = json.loads((tmp_path / "runs/reads/train/summary.json").read_text())
    assert summary["tokens"] > 0  # tokens are still counted, on the host
    if kind.startswith("generative"):
        assert summary["train_path"]["loss"] == ("logits" if kind.endswith("logits") else "chunked")
        assert summary["train_path"]["packing"] == ("varlen" if kind.endswith("varlen") else "block_mask")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_head_batch_with_the_4d_mask_gives_what_the_2d_mask_gives(tiny_model_dir, attention):
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoTokenizer

    from tunesmith.machine.masks import mask_kind
    from tunesmith.train.heads import head_collator
    from tunesmith.train.trainer import expand_padding_mask

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token, tok.padding_side = tok.pad_token or tok.eos_token, "right"
    rows = [{"input_ids": tok(t)["input_ids"], "labels": 0}
            for t in ("my card has not arrived yet", "pin blocked", "how old must I be to open an account here")]
    for auto in (AutoModelForSequenceClassification, AutoModelForQuestionAnswering):
        torch.manual_seed(0)
        model = auto.from_pretrained(tiny_model_dir, attn_implementation=attention, num_labels=2).eval()
        model.config.pad_token_id = tok.pad_token_id
        kind = mask_kind(model)
        assert kind == {"sdpa": "bool", "eager": "float"}[attention]
        plain = head_collator(tok)(rows)
        ours = dict(plain)
        expand_padding_mask(ours, kind, torch.float32)  # what TokenCountingTrainer does with the batch
        assert plain["attention_mask"].dim() == 2 and ours["attention_mask"].dim() == 4
        assert plain["num_tokens"] == sum(len(r["input_ids"]) for r in rows)
        with torch.no_grad():
            a = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"])
            b = model(input_ids=ours["input_ids"], attention_mask=ours["attention_mask"])
        for key in ("logits", "start_logits", "end_logits"):
            if key in a:  # every position, padding included (a span head's loss reads them all)
                torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
