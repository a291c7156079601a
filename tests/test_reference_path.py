"""``train.path: reference`` (plain TRL / transformers) against tunesmith's default path on a CPU: the same seed,
weights, LoRA and rows give the same logged losses for SFT LoRA, DPO and the classifier head, and the path is
named in summary.json.

Packing is off on both sides for SFT: TRL packs only padding-free under FlashAttention (no CPU), so its reference
trains padded batches; tunesmith's packed rows hold several examples per row and so form other batches. Unpacked,
both sides score the same examples per step, and the losses agree to float32 rounding (the tolerance below;
measured: equal to 1e-7). While the reference side trains, tunesmith's trainers, collator and loss forms refuse to
be built, so a reference run that fell back on them fails.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
from rich.console import Console

from tunesmith.config import validate_recipe
from tunesmith.records import Example

from .conftest import EXAMPLE_CSV, banking_rows, write_jsonl

LABELS = ("card_arrival", "pin_blocked", "age_limit")
TOLERANCE = 1e-5  # relative, per logged loss: float32 sums in another order (TRL's collator, the model's own loss)


@contextmanager
def _no_bar(desc, total):
    yield lambda n=1, info="", skip=0: None


def _examples() -> list[Example]:
    return [Example(f"m{i}", {"text": r["text"]}, r["category"]) for i, r in enumerate(banking_rows(LABELS, 6))]


def _train(tmp_path, model_dir, path: str, method: str = "sft", head: str = "generative", **train):
    """Train a few steps on ``path``; the run's summary.json and its logged training losses."""
    from tunesmith.train.jobs import TrainData
    from tunesmith.train.jobs import train as run_training

    section = {"method": method, "head": head, "path": path, "max_steps": 3, "batch_size": 4, "logging_steps": 1,
               "learning_rate": 1e-3, "warmup_ratio": 0.0, "lr_scheduler": "constant", "packing": False,
               "group_by_length": False, "max_seq_length": 128, **train}
    recipe = validate_recipe({
        "name": f"{method}-{head}-{path}", "output_dir": str(tmp_path / "runs"), "seed": 3,
        "model": {"name": str(model_dir)},
        "data": {"path": str(EXAMPLE_CSV), "input_fields": ["text"], "target_field": "category"},
        "train": section,
    })
    examples = _examples()
    result = run_training(recipe, TrainData(examples, [], list(LABELS)), Console(quiet=True), _no_bar)
    summary = json.loads((recipe.run_dir / "train" / "summary.json").read_text(encoding="utf-8"))
    return summary, [r["train_loss"] for r in result.rows if r.get("train_loss") is not None]


def _refuse(what: str):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{what} built on train.path: reference")

    return refuse


@pytest.fixture()
def forbid_tunesmith_trainers(monkeypatch):
    """Call to make tunesmith's own trainers, packing collator and chunked loss refuse to be built from then on."""
    def forbid():
        from tunesmith.machine.packing import PackedCollator
        from tunesmith.train import chunked_loss
        from tunesmith.train.dpo_trainer import SyncFreeDPOTrainer
        from tunesmith.train.trainer import TokenCountingTrainer

        for cls in (PackedCollator, SyncFreeDPOTrainer, TokenCountingTrainer):  # CompletionTrainer is a TokenCounting one
            monkeypatch.setattr(cls, "__init__", _refuse(cls.__name__))
        monkeypatch.setattr(chunked_loss, "add_target_head", _refuse("the chunked loss"))

    return forbid


def _same_losses(ours: list[float], ref: list[float]) -> None:
    assert len(ours) == len(ref) == 3
    assert ours[0] != ours[-1]  # training moved the loss: the comparison is of steps that learned
    assert ours == pytest.approx(ref, rel=TOLERANCE), (ours, ref)


def test_sft_lora_reference_loss_matches_the_default_path(tmp_path, tiny_model_dir, forbid_tunesmith_trainers):
    ours, ours_losses = _train(tmp_path, tiny_model_dir, "fast")
    forbid_tunesmith_trainers()
    with pytest.raises(AssertionError, match="built on train.path: reference"):  # the guard bites on the default path
        _train(tmp_path / "guard", tiny_model_dir, "fast")
    ref, ref_losses = _train(tmp_path, tiny_model_dir, "reference")
    _same_losses(ours_losses, ref_losses)
    assert ours["train_path"]["name"] == "fast" and "reference" not in ours["train_path"]["reasons"].get("path", "")
    assert ref["train_path"]["name"] == "reference"
    assert ref["train_path"]["reasons"]["path"] == "reference: plain TRL/transformers, none of tunesmith's trainers"
    assert ref["train_path"]["packing"] == "off" and ref["train_path"]["loss"] == "logits"
    from tunesmith.runs.once import path_line  # the report's "training path" line

    assert path_line(ref["train_path"]).startswith("reference: plain TRL/transformers")
    assert not path_line(ours["train_path"]).startswith("reference")


def test_dpo_reference_loss_matches_the_default_path(tmp_path, tiny_model_dir, forbid_tunesmith_trainers):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": r["text"], "chosen": r["category"], "rejected": "I cannot help with that."}
        for r in banking_rows(LABELS, 4)])
    dpo = {"path": str(pairs), "beta": 0.1}
    ours, ours_losses = _train(tmp_path, tiny_model_dir, "fast", method="dpo", dpo=dpo)
    forbid_tunesmith_trainers()
    ref, ref_losses = _train(tmp_path, tiny_model_dir, "reference", method="dpo", dpo=dpo)
    _same_losses(ours_losses, ref_losses)
    assert ref["train_path"]["name"] == "reference"


def test_classifier_head_reference_loss_matches_the_default_path(tmp_path, tiny_model_dir, forbid_tunesmith_trainers):
    ours, ours_losses = _train(tmp_path, tiny_model_dir, "fast", head="classifier")
    forbid_tunesmith_trainers()
    ref, ref_losses = _train(tmp_path, tiny_model_dir, "reference", head="classifier")
    _same_losses(ours_losses, ref_losses)
    assert ref["train_path"]["name"] == "reference" and ref["train_path"]["loss"] == "head"


def test_reference_refuses_tunesmiths_own_head_settings():
    from tunesmith.errors import ConfigError

    with pytest.raises(ConfigError, match="path: reference trains transformers' own heads"):
        validate_recipe({"name": "x", "model": {"name": "m"}, "data": {"path": "d", "input_fields": ["text"],
                                                                       "target_field": "y"},
                         "train": {"head": "classifier", "path": "reference", "pooling": "mean"}})


def test_every_trainer_of_the_default_path_has_a_reference_one():
    from tunesmith.errors import ConfigError
    from tunesmith.models.heads import HEADS
    from tunesmith.train.jobs import trainer_for

    pairs = [("sft", "generative"), ("dpo", "generative"), *(("sft", h) for h in HEADS)]
    for method, head in pairs:
        assert trainer_for(method, head, "reference") is not trainer_for(method, head)
    with pytest.raises(ConfigError, match="dpo with train.head span on train.path reference: nothing trains that"):
        trainer_for("dpo", "span", "reference")


@pytest.mark.parametrize("flash", [True, False])
def test_the_reference_path_on_a_gpu_takes_trls_documented_settings(flash):
    """Pure (no GPU needed): bf16, Liger where installed, TRL's padding-free batches only under FlashAttention,
    the model's own loss, and the path named with its reason."""
    from tunesmith.machine.device import REFERENCE, Capabilities, Wishes, choose_path

    caps = Capabilities(cuda=True, bf16=True, compute_capability=(9, 0), flash_attn=flash, flex_attention=True,
                        liger=True, device_name="H100")
    path = choose_path(caps, Wishes(path="reference"), fits_without_checkpointing=True)
    assert (path.name, path.dtype, path.kernels, path.loss) == ("reference", "bfloat16", "liger", "logits")
    assert (path.attention, path.packing) == (("flash_attention_2", "position_ids") if flash else ("sdpa", "off"))
    assert path.reasons["path"] == REFERENCE and path.describe().startswith(REFERENCE)
    default = choose_path(caps, Wishes(path="fast"), fits_without_checkpointing=True)
    assert default.name == "fast" and default.loss == "chunked" and "path" not in default.reasons
    head = choose_path(caps, Wishes(path="reference", head="classifier"), fits_without_checkpointing=True)
    assert (head.packing, head.loss) == ("off", "head")


def test_conversation_rows_on_the_reference_path_are_refused_naming_the_setting(tmp_path, tiny_model_dir):
    """TRL's SFTTrainer trains a conversation on every token unless its chat template marks the assistant turns;
    tunesmith's per-turn weights have no TRL form, so such rows are a config error naming train.path: auto."""
    from tunesmith.errors import ConfigError
    from tunesmith.train.jobs import TrainData
    from tunesmith.train.jobs import train as run_training

    recipe = validate_recipe({"name": "chat", "output_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_model_dir)},
                              "train": {"path": "reference", "max_steps": 1}})
    rows = [{"messages": [{"role": "user", "content": "card arrival?"}, {"role": "assistant", "content": "soon"}],
             "tools": None}] * 2
    with pytest.raises(ConfigError, match="conversations .* set train.path: fast"):
        run_training(recipe, TrainData(rows=rows), Console(quiet=True), _no_bar)
