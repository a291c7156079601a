"""The serving engine's weight-first linear layers (``tunesmith.models.few_rows``): the same numbers as PyTorch's
``linear`` at every row count and shape, gradients included; only float32 CPU layers are turned; a turned model
decodes a step of two rows to the plain model's logits; the builtin engine serves with them."""

import pytest
import torch
from torch import nn

from tunesmith.models.few_rows import MAX_ROWS, MIN_ROWS, FewRowsLinear, weight_first_for_few_rows


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 24), (3, 24), (2, 1, 24), (1, 4, 24), (2, 5, 24), (0, 24)])
def test_a_few_rows_weight_first_equal_linear(shape, bias):
    torch.manual_seed(0)
    plain = nn.Linear(24, 40, bias=bias)
    turned = nn.Linear(24, 40, bias=bias)
    turned.load_state_dict(plain.state_dict())
    weight_first_for_few_rows(turned)
    assert type(turned) is FewRowsLinear
    x = torch.randn(*shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    want, got = plain(x), turned(x2)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if x.numel():
        want.square().sum().backward()
        got.square().sum().backward()
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(turned.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)


def test_only_float32_cpu_layers_are_turned_and_many_rows_or_one_take_linear(monkeypatch):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).to(torch.bfloat16), nn.Linear(8, 8))
    assert weight_first_for_few_rows(model) == 2
    assert [type(m) for m in model] == [FewRowsLinear, nn.Linear, FewRowsLinear]
    called = []
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: called.append(a[0].shape) or torch.zeros(1))
    model[0](torch.randn(MIN_ROWS, 8))
    model[0](torch.randn(MAX_ROWS, 8))
    assert called == []  # a few rows: weight-first
    model[0](torch.randn(MAX_ROWS + 1, 8))
    model[0](torch.randn(MIN_ROWS - 1, 8))
    assert called == [(MAX_ROWS + 1, 8), (MIN_ROWS - 1, 8)]  # more, or one: PyTorch's own linear


def test_a_turned_model_decodes_two_rows_to_the_plain_models_logits(tiny_model_dir):
    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.loading import load_model

    plain = load_model(str(tiny_model_dir), pick_placement())
    turned = load_model(str(tiny_model_dir), pick_placement())
    assert weight_first_for_few_rows(turned) > 0
    ids = torch.tensor([[5, 9, 13, 17], [6, 10, 14, 18]])
    with torch.inference_mode():
        logits = [m(input_ids=ids).logits for m in (plain, turned)]  # 8 rows: linear in both
        caches = [m(input_ids=ids, use_cache=True).past_key_values for m in (plain, turned)]
        step = [m(input_ids=torch.tensor([[21], [22]]), past_key_values=c, use_cache=True).logits
                for m, c in zip((plain, turned), caches, strict=True)]  # 2 rows: weight-first in the turned one
    torch.testing.assert_close(logits[1], logits[0])
    torch.testing.assert_close(step[1], step[0], rtol=1e-4, atol=1e-4)


def test_the_builtin_engine_serves_with_weight_first_layers(tiny_model_dir):
    from tunesmith.serve.engines.builtin import Engine

    engine = Engine(str(tiny_model_dir), {}, wait_ms=1)
    try:
        linears = [m for m in engine.model.modules() if isinstance(m, nn.Linear)]
        assert linears and all(type(m) is FewRowsLinear for m in linears)
    finally:
        engine.close()
