"""The reference training path (``train.path: reference``): plain TRL ``SFTTrainer`` / ``DPOTrainer`` (and
``GRPOTrainer``, chosen in :mod:`tunesmith.train.grpo`) and transformers' own ``Trainer`` and heads, with their
documented settings (bf16 on a GPU, TRL's padding-free batches where FlashAttention runs them,
``use_liger_kernel`` where Liger is installed) and none of tunesmith's trainers, collators or loss forms (no
:class:`~tunesmith.train.trainer.CompletionTrainer` or ``TokenCountingTrainer``, no
:class:`~tunesmith.machine.packing.PackedCollator`, no chunked loss, no sync-free DPO trainer).

It is the peer ``benchmarks/gpu_train.py`` measures the default path against, as a switch a user can fall back on
when the default path fails, or its loss differs from this one, on their GPU. What stays tunesmith's is what
surrounds the trainer: the data read and formatted, examples too long set aside, the model loaded with the recipe's
seeded PEFT adapter, the progress bar, checkpoints and resume, and the outputs (metrics.csv, summary.json and the
report, which name the path).
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.config import Recipe
from tunesmith.errors import ConfigError
from tunesmith.models.heads import HEADS
from tunesmith.train.dpo import dpo_job
from tunesmith.train.heads import head_job
from tunesmith.train.jobs import TrainJob, trainer
from tunesmith.train.result import TrainResult
from tunesmith.train.sft import LIGER_WITHOUT_LOSS, base_args, sampling_strategy, sft_job

TUNESMITH_ONLY = ("liger_kernel_config", "logging_nan_inf_filter")  # base_args' settings of tunesmith's own path


def reference_args(recipe: Recipe, placement, out_dir: Path, has_val: bool = False) -> dict:
    """The recipe's settings as TRL / transformers arguments: the shared ones (steps, batch, schedule, seed,
    precision from the path: bf16 on a GPU, checkpoints, trackers) without tunesmith's own choices (Liger's
    kernels without their fused loss, the step loss read unfiltered), so that ``use_liger_kernel`` means Liger's
    default set; tokens counted by the Trainer; validation and early stopping as the recipe asks."""
    t = recipe.train
    args = {k: v for k, v in base_args(recipe, placement, out_dir).items() if k not in TUNESMITH_ONLY}
    args |= dict(include_num_input_tokens_seen="non_padding", train_sampling_strategy=sampling_strategy(recipe))
    if has_val:
        stop = bool(t.early_stopping_patience)
        args |= dict(eval_strategy="steps" if t.eval_steps else "epoch", eval_steps=t.eval_steps,
                     per_device_eval_batch_size=args["per_device_train_batch_size"],
                     load_best_model_at_end=stop, metric_for_best_model="eval_loss" if stop else None)
        if stop:  # the best model is kept from a checkpoint saved at an evaluation
            args |= dict(save_strategy="steps", save_steps=t.eval_steps)
    return args


def reference_sft_trainer(recipe: Recipe, model, tokenizer, train_rows: list[dict], val_rows: list[dict], placement,
                          out_dir: Path, **arg_overrides):
    """TRL's ``SFTTrainer`` on prompt/completion rows: its own tokenization, completion-only loss (unless
    ``train.train_on_inputs``), padding-free packing where the path packs (FlashAttention), its own collator."""
    from datasets import Dataset
    from transformers import EarlyStoppingCallback
    from trl import SFTConfig, SFTTrainer

    if any("messages" in row for row in train_rows):
        raise ConfigError("train.path: reference trains prompt/completion rows; conversations (messages, with a loss "
                          "on each weight-1 assistant turn) train on tunesmith's path: set train.path: fast")
    t = recipe.train
    packed = placement.path is not None and placement.path.packing == "position_ids"
    config = SFTConfig(**reference_args(recipe, placement, out_dir, bool(val_rows)) | arg_overrides,
                       max_length=t.max_seq_length, packing=packed, completion_only_loss=not t.train_on_inputs)
    stop = [EarlyStoppingCallback(t.early_stopping_patience)] if t.early_stopping_patience and val_rows else []
    return SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(train_rows),
                      eval_dataset=Dataset.from_list(val_rows) if val_rows else None, processing_class=tokenizer,
                      callbacks=stop)


def reference_dpo_trainer(recipe: Recipe, model, tokenizer, placement, pairs: list[dict], out_dir: Path):
    """TRL's ``DPOTrainer`` (the reference model: the adapter switched off), padding-free where the path packs."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    t = recipe.train
    config = DPOConfig(**reference_args(recipe, placement, out_dir), beta=t.dpo.beta,
                       precompute_ref_log_probs=t.dpo.precompute_ref_log_probs, max_length=t.max_seq_length,
                       padding_free=placement.path is not None and placement.path.packing == "position_ids")
    return DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)


def reference_head_trainer(recipe: Recipe, model, tokenizer, placement, rows: list[dict], out_dir: Path, loss_func,
                           mask: str):
    """transformers' ``Trainer`` on a head model (``*ForSequenceClassification``, ``*ForQuestionAnswering``) with its
    padding collator and the model's own loss (or the recipe's regression loss as ``compute_loss_func``); ``mask``,
    tunesmith's 4D padding mask, is not used."""
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    keys = {*tokenizer.model_input_names, "labels", "start_positions", "end_positions"}
    args = reference_args(recipe, placement, out_dir)
    if args.get("use_liger_kernel"):  # Liger's default set swaps in a fused loss over ``lm_head``, which a head model
        args["liger_kernel_config"] = LIGER_WITHOUT_LOSS  # lacks (an AttributeError, seen on an H200)
    args = TrainingArguments(**args)
    return Trainer(model=model, args=args, train_dataset=Dataset.from_list([{k: v for k, v in r.items() if k in keys}
                                                                            for r in rows]),
                   processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                   compute_loss_func=loss_func)


@trainer("sft", "generative", path="reference")
def reference_sft_job(job: TrainJob) -> TrainResult:
    return sft_job(job, build=reference_sft_trainer)


@trainer("dpo", "generative", path="reference")
def reference_dpo_job(job: TrainJob) -> TrainResult:
    return dpo_job(job, build=reference_dpo_trainer)


@trainer("sft", *HEADS, path="reference")
def reference_head_job(job: TrainJob) -> TrainResult:
    return head_job(job, build=reference_head_trainer)
