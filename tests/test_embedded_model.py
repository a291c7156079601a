"""Checks on the real embedded model; `make test` pulls it first, elsewhere they skip with a reason."""

import json

import pytest

from tunesmith.models import registry

pytestmark = pytest.mark.slow
NAME = "smollm2-135m-instruct"
needs_model = pytest.mark.skipif(
    not registry.is_cached(NAME), reason=f"{NAME} not cached; run `tunesmith models pull {NAME}`"
)


@needs_model
def test_cached_folder_is_trainable_and_generates():
    from tunesmith.data.formatting import end_of_turn, prompt_text
    from tunesmith.eval.generation import generate_greedy
    from tunesmith.models.loading import load_model, load_tokenizer, pick_placement

    folder = registry.cached_path(NAME)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    model = load_model(NAME, pick_placement("fp32", "cpu"))
    tok = load_tokenizer(NAME)
    assert getattr(model, "hf_quantizer", None) is None
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert end_of_turn(tok) == "<|im_end|>"
    prompt = prompt_text(tok, [{"role": "user", "content": "What is the capital of France?"}])
    (answer,) = generate_greedy(model, tok, [prompt], max_new_tokens=20)
    assert "Paris" in answer
