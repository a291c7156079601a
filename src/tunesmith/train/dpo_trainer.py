"""TRL's DPOTrainer with steps that never wait for the device.

TRL's DPO loss reads values on the host every micro-step for its logged metrics (entropy, token
counts, mean logits, token accuracy, rewards, margins, log-probabilities: each an ``.item()``, and
boolean indexes sized by the mask's values), and transformers checks the 2D padding mask's values
once per forward pass (policy and reference): 23 reads per step on a CPU; on a GPU its fused head also
picks the completion positions with a boolean mask in each forward pass. On a GPU each read waits
until every queued kernel has run. Here the same loss is computed from the same per-token outputs,
scored at completion positions the collator found on the host (:mod:`tunesmith.train.chunked_loss`,
which TRL's ``fused_lm_head`` call reaches, the reference pass's too), its metrics stay on the device
and are read once per logging step, the tokens are counted on the host by the collator, and a decoder
gets the 4D mask it would have built itself, built on the device
(:func:`~tunesmith.machine.masks.padded_causal_mask`). Loss types,
f-divergences and options other than TRL's default sigmoid DPO run TRL's own loss unchanged.
"""

from __future__ import annotations

import torch.nn.functional as F
from trl import DPOTrainer

from tunesmith.train.trainer import expand_padding_mask

NOT_MODEL_INPUTS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")


class PreferenceBatches:
    """TRL's preference collator plus ``num_tokens``, the batch's real tokens, a Python int counted from the
    examples as TRL's collator truncates them, and the completion's target positions found on the host
    (:func:`target_positions`)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collate(examples)
        limit = getattr(self.collate, "max_length", None) or float("inf")
        batch["num_tokens"] = sum(min(len(e["prompt_ids"]) + len(e[side]), limit)
                                  for e in examples for side in ("chosen_ids", "rejected_ids"))
        return batch | target_positions(batch["input_ids"], batch["completion_mask"])


def target_positions(input_ids, completion_mask) -> dict:
    """The positions whose next token is a completion token, as :mod:`tunesmith.train.chunked_loss` takes them: flat
    indices into the ``(rows, L)`` batch, their next tokens, and flat indices into TRL's ``(rows, L - 1)``
    per-token layout. Found where the collator runs (the host), so the forward passes size nothing by the
    device's values (TRL's fused head picks them with a boolean mask: a wait for the GPU in every forward pass)."""
    rows, cols = completion_mask[:, 1:].bool().nonzero(as_tuple=True)  # position c predicts token c + 1
    width = input_ids.shape[1]
    return {"target_index": rows * width + cols, "target_labels": input_ids[rows, cols + 1],
            "target_layout": rows * (width - 1) + cols}


class SyncFreeDPOTrainer(DPOTrainer):
    """DPOTrainer whose metrics are kept as device tensors during steps and read together when it logs; ``mask``
    (``"bool"`` or ``"float"``, see :func:`~tunesmith.machine.masks.padded_mask_kind`) gives a decoder its 4D
    mask, built from the 2D one on the device."""

    def __init__(self, *args, mask: str = "2d", mask_dtype=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask, self.mask_dtype = mask, mask_dtype
        self._plain = (self.loss_types == ["sigmoid"] and self.f_divergence_type == "reverse_kl"
                       and self.ld_alpha is None and not self.use_weighting and not self.aux_loss_enabled
                       and not self._is_vision_dataset)
        if self._plain:  # TRL's own loss counts the tokens from the 2D mask itself
            from tunesmith.train.chunked_loss import add_target_head

            self.data_collator = PreferenceBatches(self.data_collator)
            for model in (self.model, self.ref_model):  # TRL's reference pass reaches it through the batch's keys
                if model is not None:
                    add_target_head(model)

    def _compute_loss(self, model, inputs, return_outputs):
        if not self._plain:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        tokens = inputs.pop("num_tokens")
        if mode == "train":  # this process's tokens, as TokenCountingTrainer counts them
            self._total_train_tokens += tokens
            self.state.num_input_tokens_seen += tokens
        if return_outputs:  # evaluation asked for logits: TRL's loss, with its reads, outside training steps
            return super()._compute_loss(model, inputs, return_outputs)
        expand_padding_mask(inputs, self.mask, self.mask_dtype)  # the reference's forward pass gets it too
        completion = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion == 0, -100)
        kwargs = {k: v for k, v in inputs.items() if k not in NOT_MODEL_INPUTS}
        outputs = model(**kwargs, use_cache=False, labels=labels, fused_lm_head=True)
        mask = completion[:, 1:]
        width = mask.size(1)
        chosen, rejected = outputs.log_probs[:, -width:].sum(dim=1).chunk(2)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(self.ref_model or self.model, inputs)
        chosen_rewards = self.beta * (chosen - ref_chosen).detach()
        rejected_rewards = self.beta * (rejected - ref_rejected).detach()
        loss = -F.logsigmoid(self.beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
        self._keep(mode, outputs, mask, width, chosen, rejected, chosen_rewards, rejected_rewards)
        return loss

    def _keep(self, mode, outputs, mask, width, chosen, rejected, chosen_rewards, rejected_rewards) -> None:
        """TRL's metrics of one micro-step, as device tensors (boolean indexing, which sizes its result on the
        host, replaced by multiplying with the mask)."""
        gather, gathered = self.accelerator.gather_for_metrics, self.accelerator.gather
        metrics = self._metrics[mode]

        def ratio(num, den):
            num, den = gather(num).sum(), gather(den).sum()
            return num / den.clamp(min=1)  # 0 where there are no tokens, as TRL says

        entropy = outputs.entropy[:, -width:].detach()
        metrics["entropy"].append(ratio((entropy * mask).sum(), mask.sum()))
        metrics["num_tokens"] = [self._total_train_tokens]
        chosen_mask, rejected_mask = mask.chunk(2)
        chosen_logits, rejected_logits = outputs.mean_logits[:, -width:].detach().chunk(2)
        metrics["logits/chosen"].append(ratio((chosen_logits * chosen_mask).sum(), chosen_mask.sum()))
        metrics["logits/rejected"].append(ratio((rejected_logits * rejected_mask).sum(), rejected_mask.sum()))
        chosen_top1, _ = outputs.is_top1[:, -width:].chunk(2)
        metrics["mean_token_accuracy"].append(ratio((chosen_top1 & chosen_mask.bool()).sum(), chosen_mask.sum()))
        metrics["rewards/chosen"].append(gathered(chosen_rewards).mean())
        metrics["rewards/rejected"].append(gathered(rejected_rewards).mean())
        metrics["rewards/accuracies"].append(gathered((chosen_rewards > rejected_rewards).float()).mean())
        metrics["rewards/margins"].append(gathered(chosen_rewards - rejected_rewards).mean())
        metrics["logps/chosen"].append(gathered(chosen.detach()).mean())
        metrics["logps/rejected"].append(gathered(rejected.detach()).mean())

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """Read every kept metric in one transfer, then log as TRL does (the mean over the micro-steps)."""
        import torch

        metrics = self._metrics["train" if self.model.training else "eval"]
        kept = [k for k, v in metrics.items() if v and torch.is_tensor(v[0])]
        if kept:
            means = torch.stack([torch.stack(metrics[k]).float().mean() for k in kept]).tolist()
            for key, value in zip(kept, means, strict=True):
                metrics[key] = [value]
        super().log(logs, start_time)
