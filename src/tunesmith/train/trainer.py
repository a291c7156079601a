"""The transformers Trainer with one change: the loss is taken on packed, pre-aligned targets.

Everything else — optimizer, scheduler, checkpoints with RNG and data position, gradient
accumulation, distributed training, callbacks — is the Trainer's own. ``compute_loss`` asks the
model to score only the positions where a target exists, in vocabulary tiles without holding their logits
(:mod:`tunesmith.train.chunked_loss`; or their logits at once, ``logits_to_keep`` with a boolean mask), so
prompt positions never reach the output projection, and logs token accuracy, tokens/s and peak memory.
"""

from __future__ import annotations

import time

from transformers import Trainer

from tunesmith.machine.memory import peak_rss, reset_peak_rss


def peak_memory_mb() -> float:
    """Peak memory of this process since the last ``reset_peak_memory()``: the CUDA allocator's peak on a GPU,
    the resident set's high-water mark on a CPU (Linux VmHWM; elsewhere the peak of the process's life)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        return peak_rss() / 2**20
    except (OSError, KeyError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


_EARLIER_PEAK_MB = 0.0  # the largest peak that a reset has cleared: the process's own peak is not lost


def process_peak_memory_mb() -> float:
    """Peak memory of this process's whole life, across every :func:`reset_peak_memory` (what ``/usr/bin/time -v``
    cannot read once a reset cleared the kernel's mark): a run's peak, evaluation included."""
    return max(_EARLIER_PEAK_MB, peak_memory_mb())


def reset_peak_memory() -> None:
    """Start a new peak, so that each training reports its own and not that of an earlier arm in the same
    process (the CUDA allocator's peak; on Linux the resident high-water mark). The peak it clears is kept
    for :func:`process_peak_memory_mb`."""
    import torch

    global _EARLIER_PEAK_MB
    _EARLIER_PEAK_MB = max(_EARLIER_PEAK_MB, peak_memory_mb())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        reset_peak_rss()
    except OSError:
        pass  # not Linux, or not allowed: the peak stays the process's


def completion_loss(model, inputs: dict, num_items_in_batch=None, form: str = "logits"):
    """Summed cross-entropy over the target positions, divided by the number of targets in the step.

    ``form``: ``"chunked"`` (the training path's) scores them by integer index in vocabulary tiles through the
    head :func:`~tunesmith.train.chunked_loss.add_target_head` installed (no read, no logits held); ``"logits"``
    asks the model for the targets' logits at once (``logits_to_keep`` with the boolean mask: one host read per
    micro-step on a GPU). Returns ``(loss, correct, count)``; ``correct`` counts argmax hits (token accuracy) as a
    tensor on the model's device, so that a step never waits for the device to report it (read when the Trainer
    logs).
    """
    import torch.nn.functional as F

    labels = inputs.pop("labels")
    inputs.pop("shift_labels", None)
    inputs.pop("num_tokens", None)
    keep, index = inputs.pop("logits_mask"), inputs.pop("target_index", None)
    denom = num_items_in_batch if num_items_in_batch is not None else max(labels.numel(), 1)
    if form == "chunked":
        out = model(**inputs, target_index=index, target_labels=labels)
        return -out.log_probs.sum() / denom, out.is_top1.sum(), labels.numel()
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    logits = logits.reshape(-1, logits.shape[-1]).float()
    loss = F.cross_entropy(logits, labels, reduction="sum") / denom
    correct = (logits.detach().argmax(-1) == labels).sum()
    return loss, correct, labels.numel()


class TokenCountingTrainer(Trainer):
    """Trainer whose batches carry ``num_tokens``, a Python int the collator counted, so that counting the tokens
    seen never waits for the device (the Trainer's own count reads a device tensor every step). The head models
    (classifier, regression, span) train with it as it is; ``mask`` (``"bool"`` or ``"float"``, see
    :func:`~tunesmith.machine.masks.padded_mask_kind`) turns their 2D padding mask into a decoder's 4D mask on
    the device, so transformers does not read the 2D mask's values to decide whether it may skip it."""

    def __init__(self, *args, mask: str = "2d", mask_dtype=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask, self.mask_dtype = mask, mask_dtype

    def count_tokens(self, model, inputs: dict) -> None:
        tokens = inputs.pop("num_tokens", 0)
        if model.training:
            self.state.num_input_tokens_seen += tokens

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.count_tokens(model, inputs)
        expand_padding_mask(inputs, self.mask, self.mask_dtype)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def expand_padding_mask(inputs: dict, kind: str, dtype=None) -> None:
    """Replace the batch's 2D padding mask by the decoder's 4D mask of ``kind``, built where the batch is."""
    if kind != "2d":
        from tunesmith.machine.masks import padded_causal_mask

        inputs["attention_mask"] = padded_causal_mask(inputs["attention_mask"], kind, dtype)


class CompletionTrainer(TokenCountingTrainer):
    """Trainer whose batches come from :class:`~tunesmith.machine.packing.PackedCollator`; ``loss`` is the form of
    :func:`completion_loss` (``"chunked"`` installs the target head on the model); ``varlen`` (a kernel name) trains
    the model on tunesmith's variable-length attention (:mod:`tunesmith.machine.varlen`), reading the collator's
    boundaries, for the length of :meth:`train`."""

    def __init__(self, *args, loss: str = "chunked", varlen: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_form, self.varlen = loss, varlen
        if loss == "chunked":
            from tunesmith.train.chunked_loss import add_target_head

            add_target_head(self.model)
        self.loss_is_scaled_for_ga = True  # compute_loss divides by the tokens of the whole step
        self.model_accepts_loss_kwargs = True  # so the Trainer counts those tokens for us
        self._acc = {"train": [0, 0], "eval": [0, 0]}
        self._started = None
        self._tokens_at_start = 0

    def train(self, *args, **kwargs):
        if self.varlen is None:
            return super().train(*args, **kwargs)
        from tunesmith.machine.varlen import varlen_attention

        with varlen_attention(self.model, self.varlen):
            return super().train(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and self._started is None:
            self._started = time.time()
            self._tokens_at_start = self.state.num_input_tokens_seen
        self.count_tokens(model, inputs)
        loss, correct, count = completion_loss(model, inputs, num_items_in_batch, self.loss_form)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over ranks
        acc = self._acc["train" if model.training else "eval"]
        acc[0] += correct
        acc[1] += count
        return (loss, {}) if return_outputs else loss  # prediction_step reads outputs even when unused

    def log(self, logs: dict, start_time=None) -> None:
        if "loss" in logs:
            correct, count = self._acc["train"]
            logs["mean_token_accuracy"] = int(correct) / count if count else None
            self._acc["train"] = [0, 0]
            seen = self.state.num_input_tokens_seen
            logs["num_tokens"] = seen
            elapsed = time.time() - self._started if self._started else 0
            logs["tokens_per_second"] = (seen - self._tokens_at_start) / elapsed if elapsed else None
            logs["peak_memory_mb"] = round(peak_memory_mb(), 1)
        if "eval_loss" in logs:
            correct, count = self._acc["eval"]
            logs["eval_mean_token_accuracy"] = int(correct) / count if count else None
            self._acc["eval"] = [0, 0]
        super().log(logs, start_time)

