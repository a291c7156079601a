"""The Tinker API's built-in losses, checked and computed per token. Losses follow the SDK's documentation:
sums over tokens, not means, with ``r = exp(logp − sampling_logp)`` (the learner's probability over the sampler's):

- ``cross_entropy``: ``-Σ weights·logp(target)``;
- ``importance_sampling``: ``-Σ r·advantages``;
- ``ppo``: ``-Σ min(r·A, clip(r, low, high)·A)`` (``clip_low_threshold`` 0.8, ``clip_high_threshold`` 1.2);
- ``cispo``: ``-Σ sg(clip(r, low, high))·logp·A`` (one-sided by default: 0.0 and 4.0);
- ``stable_reinforce``: the SDK names it but its formula is not published; here it is REINFORCE with a truncated
  importance weight on the logprobs the server recorded when it sampled (never the client's numbers), over sampled
  positions only: ``-Σ sg(min(r, 2))·logp·A + kl_coeff·Σ (q − logp)``, ``q`` the recorded logprob and ``r =
  exp(logp − q)`` (the second term the sampled estimate of KL(sampler ‖ learner); ``kl_coeff`` 0 by default).

A ``stable_reinforce`` datum is checked against the samples its provenance names (:func:`attach_sampler_logprobs`)
before its loss is computed from them."""

from __future__ import annotations

import numpy as np

from tunesmith.serve.tinker.wire import Datum, Span


class TrainingError(ValueError):
    """A call the trainer cannot run as asked (the caller's error): what and how to fix it."""


POLICY_INPUTS = {"target_tokens", "logprobs", "advantages"}
LOSS_INPUTS = {"cross_entropy": {"target_tokens", "weights"}, "importance_sampling": POLICY_INPUTS,
               "ppo": POLICY_INPUTS, "cispo": POLICY_INPUTS, "stable_reinforce": {"target_tokens", "advantages"}}
OPTIONAL_INPUTS = {"stable_reinforce": {"logprobs"}}  # checked against the server's record when sent
LOSSES = tuple(LOSS_INPUTS)
CLIPS = {"ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},  # the SDK's documented defaults
         "cispo": {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}}
LOSS_CONFIG = {**CLIPS, "stable_reinforce": {"kl_coeff": 0.0}}  # each loss's loss_fn_config keys and defaults
RATIO_CAP = 2.0  # stable_reinforce's truncation of the importance weight
LOGPROB_TOLERANCE = 1e-3  # a client's logprobs of a sampled token may differ this much from the recorded one


def check_loss(loss_fn: str, config: dict, data: list[Datum], vocab: int) -> None:
    """The loss and its inputs as this server computes them (token ids of a vocabulary of ``vocab``), or a
    TrainingError naming what is not."""
    from tunesmith.serve.plan.prompts import outside_vocabulary

    if loss_fn not in LOSSES:
        raise TrainingError(f"loss_fn {loss_fn!r} is not supported here; supported: {', '.join(LOSSES)} "
                            "(forward_backward_custom runs any loss on the client)")
    known = LOSS_CONFIG.get(loss_fn, {})
    if unknown := sorted(set(config) - set(known)):
        raise TrainingError(f"loss_fn_config {unknown} is not supported for {loss_fn}; "
                            + (f"it takes {', '.join(known)}" if known else "send none"))
    if loss_fn == "stable_reinforce" and not (isinstance(kl := config.get("kl_coeff", 0.0), int | float)
                                              and not isinstance(kl, bool) and 0 <= kl < float("inf")):
        raise TrainingError(f"loss_fn_config: kl_coeff {kl!r} must be a number >= 0")
    clips = clip_bounds(loss_fn, config)
    if clips and not (isinstance(clips[0], float) and isinstance(clips[1], float)
                      and 0 <= clips[0] <= clips[1] < float("inf")):
        raise TrainingError(f"loss_fn_config: clip_low_threshold {clips[0]!r} and clip_high_threshold {clips[1]!r} "
                            "must be numbers with 0 <= low <= high")
    need = LOSS_INPUTS[loss_fn]
    for i, datum in enumerate(data):
        if not datum.tokens:
            raise TrainingError(f"data[{i}].model_input is empty")
        missing, extra = need - set(datum.inputs), set(datum.inputs) - need - OPTIONAL_INPUTS.get(loss_fn, set())
        if datum.input_spans is not None and loss_fn != "stable_reinforce":
            raise TrainingError(f"data[{i}] carries provenance spans, which only stable_reinforce reads; send none "
                                f"with {loss_fn}")
        if missing:
            raise TrainingError(f"data[{i}].loss_fn_inputs lacks {sorted(missing)} (needed by {loss_fn})")
        if extra:
            raise TrainingError(f"data[{i}].loss_fn_inputs {sorted(extra)} are not used by {loss_fn}; remove them")
        for where, ids in (("model_input", datum.tokens), ("loss_fn_inputs['target_tokens']",
                                                         datum.inputs["target_tokens"].reshape(-1).tolist())):
            if (bad := outside_vocabulary(ids, vocab)) is not None:
                raise TrainingError(f"data[{i}].{where}[{bad}]: {ids[bad]} is not a token id of this model "
                                    f"(0 to {vocab - 1})")
        for name, value in datum.inputs.items():
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                at = int(np.flatnonzero(~np.isfinite(value.reshape(-1)))[0])
                raise TrainingError(f"data[{i}].loss_fn_inputs[{name!r}][{at}] is {value.reshape(-1)[at]}; every "
                                    "value must be a finite number")
            if value.size != len(datum.tokens):
                raise TrainingError(f"data[{i}].loss_fn_inputs[{name!r}] has {value.size} values for "
                                    f"{len(datum.tokens)} input tokens; give one per token")


def clip_bounds(loss_fn: str, config: dict) -> tuple | None:
    """(low, high) thresholds on the probability ratio of a clipped loss: ``config``'s, else the SDK's defaults."""
    if loss_fn not in CLIPS:
        return None
    values = {**CLIPS[loss_fn], **config}

    def number(v):
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v

    return number(values["clip_low_threshold"]), number(values["clip_high_threshold"])


def token_loss(loss_fn: str, logp, inputs: dict, config: dict | None = None):
    """Each token's loss (summed by the caller)."""
    import torch

    def f32(name):
        return torch.tensor(np.asarray(inputs[name], dtype=np.float32), device=logp.device).reshape(-1)

    if loss_fn == "cross_entropy":
        return -logp * f32("weights")
    advantages = f32("advantages")
    if loss_fn == "stable_reinforce":  # sampler_logprobs and sampled: attached from the server's record
        if "sampler_logprobs" not in inputs:
            raise TrainingError("stable_reinforce reads the server's record of each sample: call it through the API")
        sampler, sampled = f32("sampler_logprobs"), f32("sampled")
        weight = torch.clamp(torch.exp(logp - sampler), max=RATIO_CAP).detach()
        kl = float((config or {}).get("kl_coeff", 0.0))
        return sampled * (-weight * logp * advantages + kl * (sampler - logp))
    ratio = torch.exp(logp - f32("logprobs"))
    if loss_fn == "importance_sampling":
        return -ratio * advantages
    low, high = clip_bounds(loss_fn, config or {})
    clipped = torch.clamp(ratio, low, high)
    if loss_fn == "ppo":
        return -torch.minimum(ratio * advantages, clipped * advantages)
    return -clipped.detach() * logp * advantages  # cispo


def attach_sampler_logprobs(datum: Datum, recorded: dict[str, dict], session: str, where: str) -> None:
    """A stable_reinforce datum checked against the samples its provenance names (recorded for ``session``) and given
    the recorded logprobs of its sampled positions (``sampler_logprobs``, ``sampled``: 1 there, else 0).

    Its model_input must be the tokens its spans name; its target_tokens, the named sampled tokens where a sampled
    span covers them (a prompt span's targets are not trained); its advantages 0 on prompt positions; its
    ``logprobs``, when sent, the recorded ones on sampled positions."""
    if datum.input_spans is None:
        raise TrainingError(f"{where}: stable_reinforce needs provenance on every datum (Datum.with_provenance, naming "
                            "the sequence_id of the sample each position comes from)")
    n = len(datum.tokens)

    def source(span: Span, at: str) -> tuple[list[int], list[float] | None]:
        request_id, _, index = span.sequence_id.rpartition(":")
        record = recorded.get(request_id)
        if record is None or not index.isdigit() or int(index) >= len(record["sequences"]):
            raise TrainingError(f"{at}: sequence {span.sequence_id!r} is not recorded for this key (sample with "
                                "record_stability_info=True; a record is kept a day after its last use)")
        if record["session_id"] != session:
            raise TrainingError(f"{at}: sequence {span.sequence_id!r} was sampled in another session; recorded "
                                "sequences belong to the session that sampled them")
        seq = record["sequences"][int(index)]
        tokens, logprobs = (seq["tokens"], seq["logprobs"]) if span.sampled else (record["prompt"], None)
        if span.offset + span.length > len(tokens):
            raise TrainingError(f"{at}: the span runs past the {len(tokens)} "
                                f"{'sampled' if span.sampled else 'prompt'} tokens of {span.sequence_id!r}")
        part = slice(span.offset, span.offset + span.length)
        return tokens[part], None if logprobs is None else logprobs[part]

    for name, spans in (("model_input_spans", datum.input_spans), ("loss_fn_input_spans", datum.target_spans)):
        if (total := sum(s.length for s in spans)) != n:
            raise TrainingError(f"{where}.{name} cover {total} positions; the datum has {n}")
    pos = 0
    for j, span in enumerate(datum.input_spans):
        tokens, _ = source(span, f"{where}.model_input_spans[{j}]")
        if (bad := next((k for k, t in enumerate(tokens) if t != datum.tokens[pos + k]), None)) is not None:
            raise TrainingError(f"{where}.model_input[{pos + bad}] is {datum.tokens[pos + bad]}, but its span names "
                                f"token {tokens[bad]} of {span.sequence_id!r}")
        pos += span.length
    targets = datum.inputs["target_tokens"].reshape(-1)
    advantages = datum.inputs["advantages"].reshape(-1)
    sent = datum.inputs.get("logprobs")
    sampler, sampled = np.zeros(n, np.float32), np.zeros(n, np.float32)
    pos = 0
    for j, span in enumerate(datum.target_spans):
        at = f"{where}.loss_fn_input_spans[{j}]"
        tokens, logprobs = source(span, at)
        here = slice(pos, pos + span.length)
        if logprobs is None:
            if (bad := np.flatnonzero(advantages[here])).size:
                raise TrainingError(f"{where}.loss_fn_inputs['advantages'][{pos + bad[0]}] is not 0 on a prompt "
                                    "position; stable_reinforce trains sampled tokens only")
        else:
            if (bad := np.flatnonzero(targets[here] != np.asarray(tokens))).size:
                k = int(bad[0])
                raise TrainingError(f"{where}.loss_fn_inputs['target_tokens'][{pos + k}] is {int(targets[pos + k])}, "
                                    f"but its span names sampled token {tokens[k]} of {span.sequence_id!r}")
            sampler[here], sampled[here] = logprobs, 1.0
            if sent is not None and (bad := np.flatnonzero(np.abs(sent.reshape(-1)[here] - np.asarray(logprobs))
                                                           > LOGPROB_TOLERANCE)).size:
                k = int(bad[0])
                raise TrainingError(f"{where}.loss_fn_inputs['logprobs'][{pos + k}] is {float(sent.reshape(-1)[pos + k]):.4f}, "
                                    f"but {span.sequence_id!r} was sampled with {logprobs[k]:.4f}; stable_reinforce "
                                    "trains on the recorded logprobs (send the sample's own, or none)")
        pos += span.length
    datum.inputs["sampler_logprobs"], datum.inputs["sampled"] = sampler, sampled
