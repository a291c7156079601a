"""Direct preference optimisation with TRL's DPOTrainer, from preference JSONL.

Accepted rows (JSONL, or a JSON array):

- ``{"prompt": ..., "chosen": ..., "rejected": ...}`` where each is a string or chat messages;
- OpenAI's DPO format: ``{"input": {"messages": [...]}, "preferred_output": [msg],
  "non_preferred_output": [msg]}``;
- ShareGPT pairs: ``{"conversations": [{"from": "human", "value": ...}], "chosen": {...},
  "rejected": {...}}``.

With a LoRA/DoRA adapter the reference model is the base model with the adapter switched off,
so no second copy is held in memory; ``train.dpo.precompute_ref_log_probs`` scores the
reference once before training instead of at every step.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.config import Recipe
from tunesmith.errors import DataError
from tunesmith.machine.launch import is_main
from tunesmith.machine.methods import MethodSpec, register_method
from tunesmith.train.jobs import TrainJob, generative_model, trainer
from tunesmith.train.result import TrainResult, make_result, trainable_snapshot

register_method(MethodSpec(
    "dpo", sequences_per_example=2, packs=False,
    unpacked_reason="DPO compares each chosen and rejected sequence whole, one per row: never packed",
    loss=("chunked", "TRL's fused LM head scores the completions in vocabulary tiles"),
    logit_bytes_per_token=2 * 4 * 3,  # TRL's fused head: a few fp32 values per target position, no vocabulary logits
    reads_pairs=True))

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _messages(value, where: str, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user" if field == "prompt" else "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: '{field}' must be a string or a non-empty list of messages")
    out = []
    for m in value:
        role = ROLES.get(m.get("role") or m.get("from") or "") if isinstance(m, dict) else None
        content = (m.get("content") if "content" in m else m.get("value")) if isinstance(m, dict) else None
        if role is None or not isinstance(content, str):
            raise DataError(
                f"{where}: '{field}' has a message without a known role and text content: {m!r:.80}"
            )
        out.append({"role": role, "content": content})
    return out


def to_pair(row: dict, where: str) -> dict:
    """One preference row in any accepted format → TRL's conversational prompt/chosen/rejected."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "preferred_output" in row:  # OpenAI's format, tools and calls as the hermes text form
        from tunesmith.data.formats.chat_rows import openai_preference

        prompt, chosen, rejected = openai_preference(row)
    elif "conversations" in row:
        prompt, chosen, rejected = row["conversations"], row.get("chosen"), row.get("rejected")
    else:
        prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if value is None:
            raise DataError(
                f"{where}: missing '{name}' (give prompt/chosen/rejected or OpenAI's "
                "input/preferred_output/non_preferred_output)"
            )
    return {
        "prompt": _messages(prompt, where, "prompt"),
        "chosen": _messages(chosen, where, "chosen"),
        "rejected": _messages(rejected, where, "rejected"),
    }


def read_pairs(path: Path) -> list[dict]:
    """Read preference pairs; a malformed line stops with a DataError naming ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: preference file not found (train.dpo.path)")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
        return [to_pair(r, f"{path}: item {i}") for i, r in enumerate(rows)]
    pairs = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not valid JSON ({exc.msg}); fix or remove the line") from None
        pairs.append(to_pair(row, f"{path}:{n}"))
    if not pairs:
        raise DataError(f"{path}: no preference pairs")
    return pairs


def build_dpo_trainer(recipe: Recipe, model, tokenizer, placement, pairs: list[dict], out_dir: Path):
    """tunesmith's DPO trainer (:class:`~tunesmith.train.dpo_trainer.SyncFreeDPOTrainer`) on the recipe's settings."""
    from datasets import Dataset
    from trl import DPOConfig

    from tunesmith.machine.masks import padded_mask_kind
    from tunesmith.train.dpo_trainer import SyncFreeDPOTrainer
    from tunesmith.train.sft import base_args

    t = recipe.train
    args = DPOConfig(
        **base_args(recipe, placement, out_dir),
        beta=t.dpo.beta,
        precompute_ref_log_probs=t.dpo.precompute_ref_log_probs,
        max_length=t.max_seq_length,
    )
    return SyncFreeDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs),
                              processing_class=tokenizer, mask=padded_mask_kind(model),
                              mask_dtype=placement.torch_dtype)


def train_dpo(recipe: Recipe, model, tokenizer, placement, console, bar, resume: bool = False,
              callbacks: list | None = None, build=None) -> TrainResult:
    """Wrap ``model`` with the recipe's adapter and run DPO on ``train.dpo.path``; ``build`` makes the trainer (the
    arguments of :func:`build_dpo_trainer`; default: that one, tunesmith's own)."""
    from tunesmith.train.sft import fit, prepare_model, save_final

    t = recipe.train
    out_dir = recipe.run_dir / "train"
    if t.dpo.path is None:
        raise DataError("train.method dpo: no preference pairs (train.dpo.path, or a preference_pairs synth stage in a run)")
    pairs = read_pairs(t.dpo.path)
    console.print(f"{len(pairs)} preference pairs from {t.dpo.path}")
    tokenizer.padding_side = "right"
    trainer = (build or build_dpo_trainer)(recipe, prepare_model(recipe, model), tokenizer, placement, pairs, out_dir)
    before = trainable_snapshot(trainer.model)
    seconds = fit(trainer, out_dir, resume, lambda steps: bar("dpo", steps), callbacks)
    full = t.adapter == "full"
    final_dir = out_dir / ("model" if full else "adapter")
    save_final(trainer, final_dir)
    tokenizer.padding_side = "left"
    history = trainer.state.log_history
    if is_main():  # one writer under torchrun
        tokenizer.save_pretrained(str(final_dir))
        (out_dir / "dpo_log.json").write_text(json.dumps(history, indent=1), encoding="utf-8")
    margins = [h["rewards/margins"] for h in history if "rewards/margins" in h]
    if margins:
        console.print(f"reward margin (chosen - rejected): {margins[0]:.3f} → {margins[-1]:.3f}")
    return make_result(trainer, "model" if full else "adapter", final_dir, before, seconds, dpo_rows(history),
                       len(pairs), resume)


def dpo_rows(history: list[dict]) -> list[dict]:
    """DPO's log in the SFT metrics columns: the DPO loss, and the reward accuracy (chosen scored above
    rejected) as train_accuracy; a validation pass fills the valid_* columns the same way."""
    from tunesmith.train.metrics import COLUMNS, EXTRA

    rows: dict[int, dict] = {}
    for h in history:
        if "loss" not in h and "eval_loss" not in h:
            continue
        row = rows.setdefault(h["step"], {c: None for c in COLUMNS + EXTRA} | {"step": h["step"]})
        if "loss" in h:
            row |= {"train_loss": h["loss"], "train_accuracy": h.get("rewards/accuracies"),
                    "num_tokens": h.get("num_tokens"), "peak_memory_mb": h.get("peak_memory_mb")}
        if "eval_loss" in h:
            row |= {"valid_loss": h["eval_loss"], "valid_mean_token_accuracy": h.get("eval_rewards/accuracies")}
    return [rows[s] for s in sorted(rows)]


@trainer("dpo", "generative")
def dpo_job(job: TrainJob, build=None) -> TrainResult:
    """DPO of the job; ``build`` makes the trainer (default: :func:`build_dpo_trainer`)."""
    return train_dpo(job.recipe, generative_model(job), job.tokenizer, job.placement, job.console, job.bar,
                     resume=job.resume, callbacks=job.callbacks, build=build)
