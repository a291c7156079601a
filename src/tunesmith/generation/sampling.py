"""One row's generation settings and how its next token is picked.

Sampling goes through transformers' own logits processors (temperature, then top-k and top-p), after any
extra processor a caller adds for that row (a JSON-schema mask must run first, else top-p may
keep no allowed token) and OpenAI's adjustments (``logit_bias``, ``frequency_penalty``,
``presence_penalty``), which apply to greedy rows too. Each sampled row draws from its own seeded generator, so its result does
not depend on which other rows share its batch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class GenParams:
    """How one row is generated: greedy when ``temperature`` is 0 (the default), else sampled."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    frequency_penalty: float = 0.0  # OpenAI's: minus this times the count of a token already generated
    presence_penalty: float = 0.0  # minus this once for every token already generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    top_k: int = 0  # sample among the k most probable tokens only (0: all)
    stop_token_ids: tuple[int, ...] | None = None  # tokens that end the row (None: the model's end-of-sequence ids)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def adjusts(self) -> bool:
        """Whether the logits are changed before picking (penalties or a bias)."""
        return bool(self.frequency_penalty or self.presence_penalty or self.logit_bias)


class Adjustments:
    """OpenAI's ``logit_bias`` and repetition penalties as a logits processor: ``logit[j] += bias[j] -
    count[j] * frequency_penalty - (count[j] > 0) * presence_penalty``, counting generated tokens only."""

    def __init__(self, params: GenParams, prompt_len: int):
        self.params, self.prompt_len = params, prompt_len

    def __call__(self, input_ids, scores):
        import torch

        p = self.params  # new tensors, not in-place: the logits may be inference-mode tensors
        if p.logit_bias:
            ids = torch.tensor([i for i, _ in p.logit_bias], device=scores.device)
            bias = torch.zeros(scores.shape[-1], dtype=scores.dtype, device=scores.device).index_add(
                0, ids, torch.tensor([b for _, b in p.logit_bias], dtype=scores.dtype, device=scores.device))
            scores = scores + bias
        generated = input_ids[:, self.prompt_len:]
        if generated.shape[1] and (p.frequency_penalty or p.presence_penalty):
            counts = torch.zeros(scores.shape, dtype=scores.dtype, device=scores.device).scatter_add(
                1, generated, torch.ones(generated.shape, dtype=scores.dtype, device=scores.device))
            scores = scores - counts * p.frequency_penalty - (counts > 0).to(scores.dtype) * p.presence_penalty
        return scores


class RowSampler:
    """Picks one row's next token from its logits: the row's processors, then argmax or a seeded draw."""

    def __init__(self, params: GenParams, extra: Sequence = (), prompt_len: int = 0):
        import torch
        from transformers import LogitsProcessorList

        adjust = [Adjustments(params, prompt_len)] if params.adjusts else []
        self.processors = LogitsProcessorList([*adjust, *extra, *warpers(params)])
        self.rng = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else random.getrandbits(63)
            self.rng = torch.Generator().manual_seed(seed)

    def __call__(self, ids: list[int], scores) -> int:
        """``ids``: the row's prompt and generated tokens; ``scores``: its logits, shape [1, vocab]."""
        import torch

        if self.processors:
            scores = self.processors(torch.tensor([ids], device=scores.device), scores)
        if self.rng is None:
            return int(scores.argmax(-1))
        probs = torch.softmax(scores[0], -1).cpu()  # drawn on the CPU: the same seed gives the same draw on any device
        return draw(probs, self.rng)


def draw(probs, rng) -> int:
    """One token drawn from ``probs`` (a vocabulary's probabilities) with ``rng``: its cumulative sum (in float64)
    inverted at one uniform number. The same law as ``torch.multinomial``, which draws an exponential for every token
    of the vocabulary: 1.4 ms a row on a CPU at 49,152 tokens, a quarter of a 64-row sampled decoding step
    (``benchmarks/row_draws.py``). A token of probability 0 (cut by top-k or top-p) is never drawn."""
    import torch

    cdf = probs.double().cumsum(0)
    at = torch.rand((), generator=rng, dtype=torch.float64) * cdf[-1]
    token = int(torch.searchsorted(cdf, at, right=True))
    if token >= len(cdf):  # ``at`` rounded up to the total: the last token that can be drawn
        token = int(torch.nonzero(probs)[-1])
    return token


def row_sampler(params: GenParams, extra: Sequence = (), prompt_len: int = 0) -> RowSampler | None:
    """A sampler for the row, or None for plain greedy decoding (a batched argmax picks its token).
    ``prompt_len``: where generated tokens start in the ids the sampler sees (penalties count those only)."""
    if params.greedy and not extra and not params.adjusts:
        return None
    return RowSampler(params, extra, prompt_len)


def warpers(params: GenParams) -> list:
    """Temperature, top-k and top-p as transformers' warpers, in the order ``model.generate`` applies them."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if params.greedy:
        return []
    out = [TemperatureLogitsWarper(float(params.temperature))]
    if params.top_k > 0:
        out.append(TopKLogitsWarper(int(params.top_k)))
    if params.top_p < 1.0:
        out.append(TopPLogitsWarper(float(params.top_p)))
    return out


def stop_ids(tokenizer, model) -> list[int]:
    """The tokenizer's EOS plus the generation config's EOS ids (generation stops at any of them)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    return sorted(i for i in ids if i is not None)


def has_stop(text: str, stop: Sequence[str]) -> bool:
    """Whether generated text contains a stop string. Checked on the decoded text of the generated tokens only:
    transformers' ``stop_strings`` match token strings and, given the whole sequence, across the prompt's end."""
    return any(s and s in text for s in stop)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the earliest stop string."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text
