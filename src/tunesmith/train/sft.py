"""Supervised fine-tuning (LoRA, DoRA, QLoRA or full) on the transformers Trainer.

tunesmith tokenizes chat examples with a completion-only loss mask, packs each batch's examples
into shared rows isolated by a block-diagonal mask (:mod:`tunesmith.machine.packing`), computes
logits only where there is a target (:mod:`tunesmith.train.trainer`), picks precision from the
device, keeps gradient checkpointing off unless asked, and saves the adapter plus the
OpenAI-style metrics file. Checkpoints carry optimizer, scheduler, RNG and data position.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tunesmith.config import Recipe
from tunesmith.errors import DataError, TrainingError
from tunesmith.machine.launch import is_main
from tunesmith.machine.methods import MethodSpec, register_method
from tunesmith.machine.placement import Placement
from tunesmith.records import Example, Rejected
from tunesmith.train.jobs import TrainData, TrainJob, generative_model, ordered, trainer
from tunesmith.train.metrics import rows_from_log_history
from tunesmith.train.result import TrainResult, make_result, trainable_snapshot

register_method(MethodSpec("sft"))  # one example per row, packed where the path packs; the recipe's loss form


# Liger's kernels without its fused losses (which score every position through ``lm_head``)
LIGER_WITHOUT_LOSS = {"rope": True, "rms_norm": True, "swiglu": True, "geglu": True, "cross_entropy": False,
                      "fused_linear_cross_entropy": False}

def conversation_rows(prompts: list[list[dict]], targets: list[str]) -> list[dict]:
    """TRL's conversational prompt/completion rows (loss on the completion only)."""
    return [
        {"prompt": p, "completion": [{"role": "assistant", "content": t}]}
        for p, t in zip(prompts, targets, strict=True)
    ]


def prepare_model(recipe: Recipe, model):
    """Wrap with the recipe's adapter (seeded LoRA/DoRA/QLoRA) or unfreeze the whole model."""
    from tunesmith.models.loading import wrap_adapter

    if hasattr(model, "peft_config"):  # continuing from another arm's adapter (e.g. SFT, then DPO)
        return model
    t = recipe.train
    return wrap_adapter(model, t.adapter, t.lora, recipe.seed, freeze_embeddings=t.freeze_embeddings)


def split_by_length(
    rows: list[dict], ids: list[str], tokenizer, max_len: int
) -> tuple[list[dict], list[Rejected]]:
    """Keep rows whose full chat text fits ``max_len`` tokens; the rest are rejected with their length.

    Truncating them would cut the answer the loss is computed on, and TRL would then drop the
    fully masked rows without telling anyone.
    """
    from tunesmith.data.formats.chat_rows import row_tokens

    kept, rejected = [], []
    for row, ex_id in zip(rows, ids, strict=True):
        n = row_tokens(row, tokenizer)
        if n > max_len:
            rejected.append(Rejected(ex_id, "train", f"{n} tokens > train.max_seq_length {max_len}", row))
        else:
            kept.append(row)
    return kept, rejected


def base_args(recipe: Recipe, placement: Placement, out_dir: Path) -> dict:
    """The arguments every trainer (SFT, DPO, classifier) takes from the recipe, precision from the device."""
    from tunesmith.machine.fsdp import fsdp_args
    from tunesmith.machine.launch import share_batch, world_size

    t = recipe.train
    path = placement.path  # the chosen training path (tunesmith.machine.device); None: today's CPU defaults
    batch, accum = share_batch(t.batch_size, t.grad_accum, world_size())  # the recipe's batch is the global one
    return dict(
        output_dir=str(out_dir / "checkpoints"),
        seed=recipe.seed,
        data_seed=recipe.seed,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a fraction of the total steps
        weight_decay=t.weight_decay,
        optim=path.optimizer if path else ("adamw_torch" if t.optimizer == "auto" else t.optimizer),
        # bf16 autocast on a CPU without bf16 units is ~500x slower than fp32: follow the device.
        bf16=placement.dtype == "bfloat16" or bool(path and path.autocast == "bfloat16"),
        fp16=placement.dtype == "float16",
        tf32=True if path and path.tf32 else None,
        use_liger_kernel=bool(path and path.kernels == "liger"),
        # Liger's own fused loss would score every position: ours scores only the targets, in tiles (target_head)
        liger_kernel_config=LIGER_WITHOUT_LOSS if path and path.kernels == "liger" else None,
        use_cpu=placement.device == "cpu",
        activation_checkpointing=path.gradient_checkpointing if path else t.gradient_checkpointing is True,
        logging_steps=t.logging_steps,
        # the Trainer's filter of a nan/inf step loss reads the loss on the host every step (a device sync on a
        # GPU); it only changes the logged loss, which then shows the nan instead of hiding it
        logging_nan_inf_filter=False,
        save_strategy="steps" if t.save_steps else "epoch",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        report_to=list(t.report_to),
        disable_tqdm=True,
    ) | fsdp_args(recipe)


def training_args(recipe: Recipe, placement: Placement, out_dir: Path, has_val: bool, **extra):
    """TrainingArguments for SFT: validation and early stopping, length grouping, packed batches."""
    from transformers import TrainingArguments

    t = recipe.train
    eval_strategy = ("steps" if t.eval_steps else "epoch") if has_val else "no"
    save_steps = t.eval_steps if t.early_stopping_patience else t.save_steps
    base = base_args(recipe, placement, out_dir)
    kwargs = base | dict(
        per_device_eval_batch_size=base["per_device_train_batch_size"],
        train_sampling_strategy=sampling_strategy(recipe),
        length_column_name="length",
        eval_strategy=eval_strategy,
        eval_steps=t.eval_steps,
        save_strategy="steps" if save_steps else "epoch",
        save_steps=save_steps or 500,
        load_best_model_at_end=bool(t.early_stopping_patience and has_val),
        metric_for_best_model="eval_loss" if t.early_stopping_patience and has_val else None,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        prediction_loss_only=True,
        include_num_input_tokens_seen="no",  # counted by CompletionTrainer (the 4D mask has no padding sum)
    )
    kwargs.update(extra)
    return TrainingArguments(**kwargs)


def sampling_strategy(recipe: Recipe) -> str:
    """sequential when data.order sets a curriculum (the rows arrive in that order), else the recipe's choice."""
    if recipe.data is not None and recipe.data.order is not None:
        return "sequential"
    return "group_by_length" if recipe.train.grouped else "random"


def build_trainer(
    recipe: Recipe,
    model,
    tokenizer,
    train_rows,
    val_rows,
    placement: Placement,
    out_dir: Path,
    **arg_overrides,
):
    """Tokenize (completion-only mask unless ``train_on_inputs``), assemble a :class:`CompletionTrainer`."""
    from datasets import Dataset
    from transformers import EarlyStoppingCallback, PrinterCallback, ProgressCallback

    from tunesmith.data.formats.chat_rows import tokenize_rows  # conversations (every weight-1 turn) and prompt/completion
    from tunesmith.machine.packing import PackedCollator
    from tunesmith.train.trainer import CompletionTrainer

    t = recipe.train
    train_ds = Dataset.from_list(tokenize_rows(train_rows, tokenizer, t.train_on_inputs))
    val_ds = Dataset.from_list(tokenize_rows(val_rows, tokenizer, t.train_on_inputs)) if val_rows else None
    path = placement.path
    collator = PackedCollator(tokenizer.pad_token_id, pack=t.packing, mask_kind=collator_mask(model, path),
                              dtype=placement.torch_dtype,
                              capacity=t.batch_size * t.max_seq_length if one_row(path) else None)
    args = training_args(recipe, placement, out_dir, has_val=val_ds is not None, **arg_overrides)
    callbacks = (
        [EarlyStoppingCallback(t.early_stopping_patience)] if t.early_stopping_patience and val_ds else []
    )
    trainer = CompletionTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
        loss=path.loss if path is not None else "chunked",
        varlen=path.varlen if path is not None and path.packing == "varlen" else None,
    )
    for cb in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(cb)
    return trainer


def collator_mask(model, path) -> str:
    """What the packing collator gives the model to keep packed examples apart: the 4D block mask of the model's
    attention (``"bool"``/``"float"``, the CPU path), the examples' boundaries (``"varlen"``, tunesmith's
    variable-length attention) or nothing but restarting position ids (``"none"``)."""
    from tunesmith.machine.masks import mask_kind

    if path is None or path.mask_in_collator:
        return mask_kind(model)
    return "varlen" if path.packing == "varlen" else "none"


def one_row(path) -> bool:
    """Whether each micro-batch is packed into one row without padding: variable-length kernels cost nothing per
    row, so nothing is gained by rows of the longest example (SDPA's mask, L x L, is)."""
    if path is None:
        return False
    if path.packing == "varlen":
        return path.varlen in ("torch", "flash_attn")
    return path.packing == "position_ids" and path.attention == "flash_attention_2"


def make_progress_callback(advance, total_steps_hint):
    """A TrainerCallback that drives a progress bar with loss and tokens/s."""
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def __init__(self):
            self.start, self.tokens_at_start = time.time(), 0
            self.last_step = 0
            self.info = ""

        def on_train_begin(self, args, state, control, **kwargs):
            self.last_step = state.global_step  # a resumed run starts past its checkpoint: the bar does too
            if state.global_step:
                advance(0, f"resumed at step {state.global_step:,}", skip=state.global_step)
            self.start, self.tokens_at_start = time.time(), state.num_input_tokens_seen or 0

        def on_step_end(self, args, state, control, **kwargs):
            advance(state.global_step - self.last_step, self.info)
            self.last_step = state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                rate = logs.get("tokens_per_second")
                if rate is None:  # a plain Trainer (classifier head) counts tokens but does not log a rate
                    rate = ((state.num_input_tokens_seen or 0) - self.tokens_at_start) / max(time.time() - self.start, 1e-9)
                from tunesmith.train.trainer import peak_memory_mb

                peak = peak_memory_mb()
                if state.log_history and "loss" in state.log_history[-1]:  # the row metrics.csv and the summary read
                    state.log_history[-1].setdefault("tokens_per_second", rate)
                    state.log_history[-1].setdefault("peak_memory_mb", peak)
                self.info = f"loss {logs['loss']:.3f} · {rate:,.0f} tok/s · peak {peak:,.0f} MB"
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
    resume: bool = False,
    callbacks: list | None = None,
    build=None,
) -> TrainResult:
    """Train ``model`` (already wrapped by ``prepare_model``) and save the adapter or model.

    ``progress_factory(total_steps)`` returns a context manager yielding ``advance(n, info)``.
    ``resume`` continues from the newest checkpoint under ``out_dir/checkpoints``; ``callbacks``
    are extra TrainerCallbacks (the jobs worker reports events and checks for cancel with one).
    ``build`` makes the Trainer (the arguments of :func:`build_trainer`; default: that one, tunesmith's own).
    """
    tokenizer.padding_side = "right"
    trainer = (build or build_trainer)(recipe, model, tokenizer, train_rows, val_rows, placement, out_dir)
    before = trainable_snapshot(trainer.model)
    seconds = fit(trainer, out_dir, resume, progress_factory, callbacks)
    tokenizer.padding_side = "left"
    full = recipe.train.adapter == "full"
    final_dir = out_dir / ("model" if full else "adapter")
    save_final(trainer, final_dir)
    if is_main():
        tokenizer.save_pretrained(str(final_dir))
    rows = rows_from_log_history(trainer.state.log_history)
    return make_result(trainer, "model" if full else "adapter", final_dir, before, seconds, rows, len(train_rows), resume)


def save_final(trainer, final_dir: Path) -> None:
    """The trained model or adapter as one loadable folder, written by rank 0; under FSDP every rank takes
    part in gathering the shards into a full state dict (checkpoints during training stay sharded)."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None) if trainer.is_fsdp_enabled else None
    if plugin is not None:
        plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(final_dir))


def trained_seconds(checkpoint: Path | None) -> float:
    """Seconds of training behind a checkpoint (0 without one, or for one saved before the clock was kept)."""
    if checkpoint is None:
        return 0.0
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return float(((state.get("stateful_callbacks") or {}).get("TrainingClock") or {}).get("attributes", {})
                 .get("seconds", 0.0))


def make_training_clock(before: float):
    """A TrainerCallback whose state — the training seconds so far, ``before`` included — the Trainer writes
    into every checkpoint's trainer_state.json, so that a resumed run reports the time of the whole training
    (the seconds and the checkpoint are saved together: a kill cannot keep one without the other)."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    class TrainingClock(TrainerCallback, ExportableState):
        def __init__(self):
            self.start = time.time()

        def seconds(self) -> float:
            return before + time.time() - self.start

        def state(self) -> dict:
            return {"args": {}, "attributes": {"seconds": self.seconds()}}

        def on_train_begin(self, args, state, control, **kwargs):
            # a checkpoint saved before the clock was kept has no entry, and the Trainer's save expects one
            state.stateful_callbacks.setdefault(type(self).__name__, self.state())

    return TrainingClock()


def fit(trainer, out_dir: Path, resume: bool | Path, progress_factory, callbacks: list | None = None) -> float:
    """Run ``trainer.train()`` under our progress bar (the Trainer's own printing removed), from the newest
    checkpoint under ``out_dir/checkpoints`` when ``resume`` is True (from that checkpoint when it is a folder: a
    fine-tuning job's attempt goes on from the checkpoint its store recorded, in an earlier attempt's folder),
    FSDP-sharded on CPUs when the recipe asks; returns the seconds of training (those behind a resumed checkpoint
    included). An out-of-memory error says what to change."""
    from transformers import PrinterCallback, ProgressCallback

    from tunesmith.machine.fsdp import check_resumable, shard_on_cpu
    from tunesmith.train.resume import newest_checkpoint
    from tunesmith.train.trainer import reset_peak_memory

    shard_on_cpu(trainer)  # train.distributed: fsdp with CPU processes (see tunesmith.machine.fsdp)
    for cb in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(cb)
    for cb in callbacks or []:
        trainer.add_callback(cb)
    checkpoint = resume if isinstance(resume, Path) else newest_checkpoint(out_dir / "checkpoints") if resume else None
    if checkpoint is not None:
        check_resumable(checkpoint, trainer)
    steps = planned_steps(trainer)
    clock = make_training_clock(trained_seconds(checkpoint))
    trainer.add_callback(clock)
    reset_peak_memory()  # this training's peak, not an earlier arm's in the same process
    with progress_factory(steps) as advance:
        trainer.add_callback(make_progress_callback(advance, steps))
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                raise TrainingError(
                    f"Out of memory while training: {exc}. Lower train.batch_size or train.max_seq_length, "
                    "or set train.gradient_checkpointing: true (see `tunesmith train RECIPE --estimate`)."
                ) from exc
            raise
    return clock.seconds()


def planned_steps(trainer) -> int:
    """Optimizer steps the Trainer will run (max_steps, else epochs x batches per epoch)."""
    args = trainer.args
    if args.max_steps and args.max_steps > 0:
        return args.max_steps
    import math

    per_epoch = math.ceil(
        len(trainer.train_dataset)
        / (args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size))
    )
    return max(1, math.ceil(per_epoch * args.num_train_epochs))


@trainer("sft", "generative")
def sft_job(job: TrainJob, build=None) -> TrainResult:
    """Generative SFT of the job; ``build`` makes the Trainer (default: :func:`build_trainer`)."""
    return _train_sft(job.recipe, job.data, generative_model(job), job.tokenizer, job.placement, job.console, job.bar,
                      job.resume, job.callbacks, build)



def sft_rows(recipe: Recipe, examples: list[Example]) -> list[dict]:
    """Chat prompt/completion rows formatted with the recipe's data section (loss on the completion)."""
    from tunesmith.data.formats.messages import chat_messages

    return conversation_rows([chat_messages(e, recipe.data) for e in examples], [e.target for e in examples])



def _train_sft(recipe, data: TrainData, model, tokenizer, placement, console, bar, resume, callbacks,
               build=None) -> TrainResult:
    from tunesmith.data.prepare import append_jsonl
    from tunesmith.machine.launch import is_main

    if data.rows is not None:
        rows, ids, val_rows = data.rows, [f"row-{i + 1}" for i in range(len(data.rows))], data.val_rows or []
    else:
        train = ordered(recipe, data.train)
        rows, ids, val_rows = sft_rows(recipe, train), [e.id for e in train], sft_rows(recipe, data.val)
    rows, too_long = split_by_length(rows, ids, tokenizer, recipe.train.max_seq_length)
    if too_long:
        where = recipe.run_dir / "data" / "rejected.jsonl"
        if is_main():
            append_jsonl(where, (r.to_json() for r in too_long))
        console.print(f"[yellow]{len(too_long)} training example(s) longer than train.max_seq_length set aside[/] → {where}")
    if not rows:
        raise DataError("no training example fits train.max_seq_length; raise it")
    result = train_sft(recipe, prepare_model(recipe, model), tokenizer, rows, val_rows, placement,
                       recipe.run_dir / "train", lambda total: bar("train", total), resume=resume, callbacks=callbacks,
                       build=build)
    result.too_long = len(too_long)
    return result
