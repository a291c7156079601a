"""Architecture-faithful random models: the shipped config facts, scaled-down builds of every
architecture that train a step, and the refusals that keep random weights out of evaluation."""

from pathlib import Path

import pytest
import torch

from tunesmith.errors import ModelError
from tunesmith.models import random_weights as rw

# published parameter counts (model cards / safetensors index totals)
PUBLISHED = {"llama-3.2-1b": 1_235_814_400, "llama-3.1-8b": 8_030_261_248, "qwen2.5-7b": 7_615_616_512,
             "gemma-2-2b": 2_614_341_888}


def test_shipped_architectures_have_the_published_parameter_counts():
    from transformers import AutoConfig, AutoModelForCausalLM

    assert set(PUBLISHED) <= set(rw.architectures())
    for arch, count in PUBLISHED.items():
        doc = rw.base_config(arch)
        config = AutoConfig.for_model(doc.pop("model_type"), **doc)
        with torch.device("meta"):  # shapes only, no memory
            model = AutoModelForCausalLM.from_config(config)
        assert sum(p.numel() for p in model.parameters()) == count, arch


def test_names_parse_and_bad_names_say_what_is_wrong():
    spec = rw.parse("random:qwen2.5-7b?layers=2&hidden=64&vocab=600&seed=3")
    assert spec.arch == "qwen2.5-7b" and dict(spec.sizes) == {"layers": 2, "hidden": 64, "vocab": 600}
    assert spec.seed == 3 and spec.tokenizer == rw.DEFAULT_TOKENIZER
    with pytest.raises(ModelError, match="unknown architecture 'llama-9'.*llama-3.2-1b"):
        rw.parse("random:llama-9")
    with pytest.raises(ModelError, match="unknown key 'width'"):
        rw.parse("random:llama-3.2-1b?width=3")
    with pytest.raises(ModelError, match="layers='x'"):
        rw.parse("random:llama-3.2-1b?layers=x")


def test_scaling_down_keeps_the_architecture_facts():
    cfg = rw.scaled_config(rw.parse("random:qwen2.5-7b?layers=2&hidden=64"))
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["head_dim"]) == (2, 64, 16)
    assert cfg["num_attention_heads"] == 4 and cfg["num_key_value_heads"] == 1  # qwen groups 7 heads per kv head
    assert cfg["intermediate_size"] == 336  # 18944 * 64 / 3584, to a multiple of 8
    assert cfg["rope_theta"] == 1e6 and cfg["rms_norm_eps"] == 1e-6 and cfg["vocab_size"] == 152064
    gemma = rw.scaled_config(rw.parse("random:gemma-2-2b?hidden=64"))
    assert gemma["query_pre_attn_scalar"] == gemma["head_dim"] == 16 and gemma["attn_logit_softcapping"] == 50.0


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_every_architecture_builds_small_and_trains_a_step(arch, tiny_model_dir, home):
    from tunesmith.machine.placement import Placement
    from tunesmith.models.loading import load_model, load_tokenizer

    name = f"random:{arch}?layers=2&hidden=64&vocab=640&tokenizer={tiny_model_dir}"
    model = load_model(name, Placement("cpu", "float32"))
    tok = load_tokenizer(name)
    assert type(model).__name__ == rw.base_config(arch)["architectures"][0]
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 640
    assert model.config.tunesmith_random_weights == name
    again = load_model(name, Placement("cpu", "float32"))  # seeded: the same weights every time
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))
    ids = torch.tensor([tok("my card has not arrived")["input_ids"]])
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and model.get_input_embeddings().weight.grad.abs().sum() > 0


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tiny_model_dir, home):
    with pytest.raises(ModelError, match="raise vocab="):
        rw.folder_for(f"random:llama-3.2-1b?layers=1&hidden=64&vocab=100&tokenizer={tiny_model_dir}")


def test_without_a_tokenizer_the_error_names_the_pull_command(home):
    with pytest.raises(ModelError, match="tunesmith models pull smollm2-135m-instruct"):
        rw.folder_for("random:llama-3.2-1b?layers=1&hidden=64")


def _eval_recipe(tmp_path, name, allow):
    from tunesmith.config import validate_recipe

    return validate_recipe({
        "name": "rand", "output_dir": str(tmp_path / "runs"), "model": {"name": name},
        "data": {"path": "d.csv", "input_fields": ["text"], "target_field": "category"},
        "eval": {"allow_random_model": allow, "baselines": [], "bootstrap": 0, "perplexity": False, "batch_size": 4},
    })


def test_evaluation_refuses_a_random_model_unless_asked_and_the_report_says_so_first(tmp_path, tiny_model_dir, home):
    from rich.console import Console

    from tunesmith.eval.runner import LocalContender, evaluate
    from tunesmith.records import Example

    name = f"random:llama-3.2-1b?layers=1&hidden=64&vocab=640&tokenizer={tiny_model_dir}"
    test = [Example(f"t{i}", {"text": t}, label) for i, (t, label) in
            enumerate([("my card has not arrived", "card_arrival"), ("my pin is blocked", "pin_blocked")])]
    labels = ["card_arrival", "pin_blocked"]
    refused = _eval_recipe(tmp_path, name, allow=False)
    base = [LocalContender("base", "random", None, refused.data)]
    with pytest.raises(ModelError, match="random weights.*eval.allow_random_model: true"):
        evaluate(refused, [], test, labels, base, {}, Console(quiet=True))
    allowed = _eval_recipe(tmp_path, name, allow=True)
    run = evaluate(allowed, [], test, labels, base, {}, Console(quiet=True))
    first = run.report_md.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("**Random weights**") and name in first


def test_serving_refuses_a_random_model_unless_asked(tmp_path):
    from tunesmith.serve.app import ServeSettings, create_app

    with pytest.raises(ModelError, match="--allow-random-model"):
        create_app(ServeSettings(model="random:llama-3.2-1b", data_dir=tmp_path))


def test_the_estimator_reads_a_random_model_without_weights(tiny_model_dir, home):
    from tunesmith.machine.estimate import model_shape
    from tunesmith.models.names import resolve

    for arch, count in PUBLISHED.items():  # full size: config.json only, nothing is built
        shape = model_shape(Path(resolve(f"random:{arch}?tokenizer={tiny_model_dir}")))
        assert abs(shape.params - count) / count < 0.002, arch  # biases (Qwen) are left out of the count


def test_the_classifier_head_loads_a_random_model(tiny_model_dir, home):
    from tunesmith.machine.placement import Placement
    from tunesmith.models.heads import load_sequence_head
    from tunesmith.models.loading import load_tokenizer

    name = f"random:gemma-2-2b?layers=1&hidden=64&vocab=640&tokenizer={tiny_model_dir}"
    tok = load_tokenizer(name)
    model = load_sequence_head(name, Placement("cpu", "float32"), tok, ["a", "b", "c"])
    again = load_sequence_head(name, Placement("cpu", "float32"), tok, ["a", "b", "c"])
    assert type(model).__name__ == "Gemma2ForSequenceClassification" and model.config.num_labels == 3
    body = [n for n, _ in model.named_parameters() if not n.startswith("score")]
    assert all(torch.equal(model.get_parameter(n), again.get_parameter(n)) for n in body)  # written once, reread


def test_train_command_trains_a_random_model_and_its_summary_says_so_first(cli, tmp_path, tiny_model_dir, home):
    import json

    from .conftest import banking_recipe, banking_rows, write_jsonl, write_recipe

    name = f"random:qwen2.5-7b?layers=2&hidden=64&vocab=640&tokenizer={tiny_model_dir}"
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(("card_arrival", "pin_blocked"), 8))
    doc = banking_recipe(tmp_path, name, data, name="rand-train", seed=1, split={"train": 12, "val": 0, "test": 4},
                         train={"max_steps": 2, "batch_size": 4, "max_seq_length": 96, "logging_steps": 1})
    recipe = write_recipe(tmp_path / "r.yaml", doc)
    code, out = cli(["train", str(recipe), "--estimate"])
    assert code == 0 and "Expected peak memory" in out, out
    code, out = cli(["train", str(recipe)])
    assert code == 0, out
    assert "training path: cpu float32" in out
    summary = json.loads((tmp_path / "runs/rand-train/train/summary.json").read_text())
    assert list(summary)[0] == "random_weights" and name in summary["random_weights"]
    assert summary["train_path"]["packing"] == "block_mask" and summary["trainable_tensors_changed"] > 0
