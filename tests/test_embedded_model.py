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
    from tunesmith.data.formats.messages import end_of_turn, prompt_text
    from tunesmith.generation import generate_greedy
    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.loading import load_model, load_tokenizer

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


@needs_model
def test_synth_with_the_embedded_model_generates_and_caches(tmp_path):
    """A tiny real generation: 2 seed tasks evolved by SmolLM2; a rerun comes from the cache."""
    import json as _json

    from tunesmith.config import validate_recipe
    from tunesmith.synth.command import run_synth

    rows = [{"instruction": "Write a haiku about the sea."}, {"instruction": "Explain what a budget is."}]
    data = tmp_path / "seeds.jsonl"
    data.write_text("".join(_json.dumps(r) + "\n" for r in rows))
    recipe = validate_recipe({"name": "real", "output_dir": str(tmp_path / "runs"), "synth": {
        "task": "evol_instruct", "input": str(data), "max_parse_attempts": 1,
        "provider": {"kind": "local", "batch_size": 2}, "sampling": {"temperature": 0.0, "max_tokens": 40}}})
    first = run_synth(recipe)
    assert first.stats.calls_made == 2 and first.stats.completion_tokens > 0
    assert first.items + first.rejected == 2  # every input is kept or set aside with a reason
    again = run_synth(recipe)
    assert again.stats.calls_made == 0 and again.stats.cache_hits == 2
