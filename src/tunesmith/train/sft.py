"""Supervised fine-tuning (LoRA or full) through TRL's SFTTrainer.

We wrap TRL rather than subclass it: tunesmith builds the dataset, the LoRA config and the
trainer arguments (precision picked from the device, gradient checkpointing off unless asked,
length-grouped batches, completion-only loss), adds its own progress and metrics callbacks,
and saves the adapter plus the OpenAI-style metrics file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tunesmith.config import Recipe
from tunesmith.errors import TrainingError
from tunesmith.models.loading import Placement
from tunesmith.records import Rejected
from tunesmith.train.metrics import rows_from_log_history, write_metrics_csv


@dataclass
class TrainResult:
    output_dir: Path  # adapter/ (LoRA) or model/ (full)
    rows: list[dict]
    seconds: float
    tokens: int  # non-padding tokens seen
    trainable_params: int
    total_params: int
    tensors_changed: int  # trainable tensors whose values moved during training
    tensors_trainable: int
    model: object  # the trained model (PEFT-wrapped for LoRA), in eval mode

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def conversation_rows(prompts: list[list[dict]], targets: list[str]) -> list[dict]:
    """TRL's conversational prompt/completion rows (loss on the completion only)."""
    return [
        {"prompt": p, "completion": [{"role": "assistant", "content": t}]} for p, t in zip(prompts, targets, strict=True)
    ]


def prepare_model(recipe: Recipe, model):
    """LoRA-wrap (seeded) or unfreeze the whole model, as the recipe says."""
    from tunesmith.models.loading import wrap_lora

    if recipe.train.method == "lora":
        c = recipe.train.lora
        return wrap_lora(model, c.r, c.alpha, c.dropout, c.target_modules, recipe.seed)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def split_by_length(rows: list[dict], ids: list[str], tokenizer, max_len: int) -> tuple[list[dict], list[Rejected]]:
    """Keep rows whose full chat text fits ``max_len`` tokens; the rest are rejected with their length.

    Truncating them would cut the answer the loss is computed on, and TRL would then drop the
    fully masked rows without telling anyone.
    """
    kept, rejected = [], []
    for row, ex_id in zip(rows, ids, strict=True):
        n = len(tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True))
        if n > max_len:
            rejected.append(Rejected(ex_id, "train", f"{n} tokens > train.max_seq_length {max_len}", row))
        else:
            kept.append(row)
    return kept, rejected


def sft_config(recipe: Recipe, placement: Placement, out_dir: Path, has_val: bool):
    from trl import SFTConfig

    t = recipe.train
    return SFTConfig(
        output_dir=str(out_dir / "checkpoints"),
        seed=recipe.seed,
        data_seed=recipe.seed,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_length=t.max_seq_length,
        # TRL defaults to bf16 and gradient checkpointing; both make CPU training far slower.
        bf16=placement.dtype == "bfloat16",
        fp16=placement.dtype == "float16",
        use_cpu=placement.device == "cpu",
        activation_checkpointing=t.gradient_checkpointing,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        completion_only_loss=True,
        logging_steps=t.logging_steps,
        eval_strategy=("steps" if t.eval_steps else "epoch") if has_val else "no",
        eval_steps=t.eval_steps,
        save_strategy="epoch",
        save_total_limit=2,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def make_progress_callback(advance, total_steps_hint):
    """A TrainerCallback that drives a progress bar with loss and tokens/s."""
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def __init__(self):
            self.start = time.time()
            self.last_step = 0
            self.info = ""

        def on_step_end(self, args, state, control, **kwargs):
            advance(state.global_step - self.last_step, self.info)
            self.last_step = state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                tok = logs.get("num_tokens") or 0
                rate = tok / max(time.time() - self.start, 1e-9)
                self.info = f"loss {logs['loss']:.3f} · {rate:,.0f} tok/s"
            if "eval_loss" in logs:
                self.info += f" · val {logs['eval_loss']:.3f}"

    return _Progress()


def train_sft(
    recipe: Recipe,
    model,
    tokenizer,
    train_rows: list[dict],
    val_rows: list[dict],
    placement: Placement,
    out_dir: Path,
    progress_factory,
) -> TrainResult:
    """Train ``model`` (already wrapped by ``prepare_model``) and save the adapter or model.

    ``progress_factory(total_steps)`` returns a context manager yielding ``advance(n, info)``.
    """
    from datasets import Dataset
    from transformers import PrinterCallback, ProgressCallback
    from trl import SFTTrainer

    args = sft_config(recipe, placement, out_dir, has_val=bool(val_rows))
    tokenizer.padding_side = "right"
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(val_rows) if val_rows else None,
        processing_class=tokenizer,
    )
    for cb in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(cb)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainable = sum(p.numel() for p in before.values())
    total = sum(p.numel() for p in trainer.model.parameters())
    steps = _planned_steps(trainer)
    start = time.time()
    with progress_factory(steps) as advance:
        trainer.add_callback(make_progress_callback(advance, steps))
        try:
            trainer.train()
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                raise TrainingError(
                    f"Out of memory while training: {exc}. Lower train.batch_size or train.max_seq_length, "
                    "or set train.gradient_checkpointing: true."
                ) from exc
            raise
    seconds = time.time() - start
    tokenizer.padding_side = "left"
    rows = rows_from_log_history(trainer.state.log_history)
    write_metrics_csv(rows, out_dir / "metrics.csv")
    final_dir = out_dir / ("adapter" if recipe.train.method == "lora" else "model")
    trainer.save_model(str(final_dir))
    tokenizer.save_pretrained(str(final_dir))
    tokens = int(trainer.state.num_input_tokens_seen or _logged_tokens(trainer.state.log_history))
    after = dict(trainer.model.named_parameters())
    changed = sum(not after[n].detach().equal(v) for n, v in before.items())
    model = trainer.model.eval()
    return TrainResult(final_dir, rows, seconds, tokens, trainable, total, changed, len(before), model)


def _planned_steps(trainer) -> int:
    args = trainer.args
    if args.max_steps and args.max_steps > 0:
        return args.max_steps
    import math

    per_epoch = math.ceil(len(trainer.train_dataset) / (args.per_device_train_batch_size * args.gradient_accumulation_steps))
    return max(1, math.ceil(per_epoch * args.num_train_epochs))


def _logged_tokens(history: list[dict]) -> int:
    return max((int(h.get("num_tokens", 0)) for h in history), default=0)
