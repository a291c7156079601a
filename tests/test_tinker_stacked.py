"""Several runs' calls in one pass through their adapters side by side (``tunesmith.serve.tinker.stacked``): each run's
gradients, logprobs and losses are those of the same run trained alone; a forward-only call's run gets no gradient;
and what the trainer computes through a run's adapter is what peft computes from the adapter's saved files (what the
engines serve)."""

from __future__ import annotations

import numpy as np
import pytest

from tunesmith.serve.tinker import wire

RUNS = {  # name: (rank, seed, train_attn, train_mlp, train_unembed)
    "a": (4, 1, True, True, True),
    "b": (8, 2, True, True, False),
    "c": (2, 3, True, False, False),
    "d": (4, 4, True, True, True),
}


def datums(rng, count: int, vocab: int) -> list[wire.Datum]:
    out = []
    for _ in range(count):
        tokens = rng.integers(3, vocab, size=int(rng.integers(12, 60))).tolist()
        weights = (rng.random(len(tokens) - 1) < 0.7).astype(np.float32)
        out.append(wire.Datum(tokens[:-1], {"target_tokens": np.asarray(tokens[1:]), "weights": weights}))
    return out


@pytest.fixture()
def trainer(tiny_model_dir):
    from tunesmith.serve.tinker.trainer import Trainer

    trainer = Trainer(str(tiny_model_dir))
    for name, (rank, seed, attn, mlp, unembed) in RUNS.items():
        for twin in (name, f"{name}-alone"):  # the same seed: the same start
            trainer.create(twin, rank, seed, attn, mlp, unembed)
    return trainer


def grads(trainer, name: str) -> dict:
    return {n.replace(f".{name}.", ".RUN."): p.grad for n, p in trainer.model.named_parameters()
            if f".{name}." in n}


def batched_calls(monkeypatch) -> list:
    """The spans' sizes at each layer whose spans ran as one batched product (the rest ran a product per span)."""
    from tunesmith.serve.tinker import stacked

    seen = []
    batched = stacked.Reading.batched

    def counted(self, layer, x, sizes):
        seen.append(tuple(sizes))
        return batched(self, layer, x, sizes)

    monkeypatch.setattr(stacked.Reading, "batched", counted)
    return seen


@pytest.mark.parametrize("shape", ["batched", "per span"])
def test_each_runs_gradients_in_a_fused_step_equal_the_run_trained_alone(trainer, monkeypatch, shape):
    """Four runs of different ranks and layers (one forward-only) in one step, their calls of unequal sizes: one
    batched product per layer over the runs side by side (padded to the longest span), or, with one span much longer
    than the others, a product per span; with turns given, the output layer runs in slices that cut across spans."""
    import torch

    from tunesmith.serve.tinker.trainer import Call

    rng = np.random.default_rng(7)
    vocab = trainer.vocab_size()
    counts = {"batched": {"a": 1, "b": 3, "c": 2, "d": 2}, "per span": {"a": 1, "b": 1, "c": 7, "d": 1}}[shape]
    data = {name: datums(rng, n, vocab) for name, n in counts.items()}
    seen = batched_calls(monkeypatch)
    turns = []
    fused = trainer.forward_backward_many([Call(n, data[n], "cross_entropy", {}, n != "d") for n in RUNS],
                                          between=lambda: turns.append(1) and False)
    rows = sum(counts.values())  # the decoder layers' spans are of rows (the output layer's, of positions)
    assert any(sum(sizes) == rows for sizes in seen) == (shape == "batched") and len(turns) > 0
    assert sum(len(d.tokens) for ds in data.values() for d in ds) > 128  # the output layer's slices cut spans
    for k, name in enumerate(RUNS):
        alone = trainer.forward_backward(f"{name}-alone", data[name], "cross_entropy", {}, name != "d")
        for got, want in zip(fused[k][0]["logprobs"], alone[0]["logprobs"], strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        assert fused[k][1]["loss:sum"] == pytest.approx(alone[1]["loss:sum"], rel=1e-5)
        mine, theirs = grads(trainer, name), grads(trainer, f"{name}-alone")
        assert mine.keys() == theirs.keys() and mine
        for n, g in mine.items():
            if name == "d":  # forward only: no gradient at all, not a zero one
                assert g is None and theirs[n] is None, n
            else:
                assert g is not None and float((g - theirs[n]).abs().max()) <= 1e-5, n
                assert float(g.abs().max()) > 0 or "lora_B" not in n, n
    assert all(p.grad is None for n, p in trainer.model.named_parameters() if ".d." in n)
    assert torch.is_grad_enabled()


def test_the_trainers_forward_through_an_adapter_is_what_peft_serves_from_its_files(trainer, tmp_path):
    """After a step, a run's saved adapter loaded by peft (its own forward, as the engines load it) gives the logprobs
    the trainer computes through the run's adapter (its B is no longer zero: the adapter takes part)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.serve.tinker.trainer import chosen_logprobs

    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        data = datums(rng, 2, trainer.vocab_size())
        trainer.forward_backward(name, data, "cross_entropy", {}, True)
        trainer.optim_step(name, {"learning_rate": 5e-2})
        trainer.save_adapter(name, tmp_path / name)
        after = trainer.forward_backward(name, data, "cross_entropy", {}, False)[0]["logprobs"]
        base = AutoModelForCausalLM.from_pretrained(trainer.base, dtype=torch.float32)
        before = trainer.forward_backward("c-alone", data, "cross_entropy", {}, False)[0]["logprobs"]
        served = PeftModel.from_pretrained(base, str(tmp_path / name)).eval()
        for d, got, untrained in zip(data, after, before, strict=True):
            with torch.no_grad():
                logits = served(input_ids=torch.tensor([d.tokens])).logits[0]
            want = chosen_logprobs(logits, torch.tensor(d.inputs["target_tokens"])).numpy()
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
            assert np.abs(got - untrained).max() > 1e-4  # the adapter changed the answer
