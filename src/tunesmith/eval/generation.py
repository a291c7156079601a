"""Batched generation (greedy or sampled, optionally constrained) and closed-label log-likelihood scoring.

Both sort prompts by length so that a batch pads to similar lengths (padding to the longest
prompt dominates CPU time otherwise), and return results in the caller's order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Advance = Callable[[int], None]


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def generate_greedy(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 16,
    advance: Advance = lambda n: None,
    stop: Sequence[str] = (),
) -> list[str]:
    """Greedy completions for chat-formatted prompt strings (special tokens already in them).

    ``stop`` strings end a row early (a batch ends when every row has stopped) and are cut from
    the returned text together with anything after them.
    """
    rows = generate(model, tokenizer, prompts, max_new_tokens, batch_size, advance=advance, stop=stop)
    return [r.texts[0] for r in rows]


@dataclass
class Generated:
    """The ``n`` completions of one prompt and its token counts (padding excluded)."""

    texts: list[str]
    prompt_tokens: int
    completion_tokens: int


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 16,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    n: int = 1,
    seed: int | None = None,
    constraint: Callable[[int, int], object] | None = None,
    advance: Advance = lambda n: None,
    stop: Sequence[str] = (),
) -> list[Generated]:
    """Batched completions (greedy when ``temperature`` is 0, else sampled, ``n`` per prompt).

    ``constraint(rows, prompt_len)`` returns a fresh transformers ``LogitsProcessor`` for one
    batch (``rows`` = prompts in the batch x ``n``); it masks tokens, e.g. to a JSON schema.
    """
    import torch

    tokenizer.padding_side = "left"
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    outputs: list[Generated | None] = [None] * len(prompts)
    eos = stop_ids(tokenizer, model)
    sample = temperature > 0
    if seed is not None:
        torch.manual_seed(seed)
    for batch in _length_sorted_batches([len(e) for e in encoded], batch_size):
        enc = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(model.device)
        start = enc["input_ids"].shape[1]
        processors = None
        if constraint is not None:  # the mask must come before temperature and top-p (else top-p may keep
            processors = [constraint(len(batch) * n, start)] + _warpers(temperature, top_p)  # no allowed token)
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=sample,
                temperature=(1.0 if processors else temperature) if sample else None,
                top_p=(1.0 if processors else top_p) if sample else None,
                top_k=None,
                num_return_sequences=n,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
                stopping_criteria=_stop_on_text(tokenizer, start, stop) if stop else None,
                logits_processor=processors,
            )
        new = out[:, start:]
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        for b, i in enumerate(batch):
            rows = new[b * n : (b + 1) * n]
            texts = [cut_at_stop(tokenizer.decode(r, skip_special_tokens=True), stop) for r in rows]
            completion = int(sum(_generated_length(r, eos, tokenizer.pad_token_id) for r in rows))
            outputs[i] = Generated(texts, int(prompt_lens[b]), completion)
        advance(len(batch))
    return outputs


def _warpers(temperature: float, top_p: float) -> list:
    """Temperature and top-p as explicit processors, to run after a constraint's mask."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    if temperature <= 0:
        return []
    return [TemperatureLogitsWarper(temperature)] + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])


def _generated_length(row, eos: Sequence[int], pad: int | None) -> int:
    """Tokens generated in one row: up to and including the first end-of-turn token."""
    ids = row.tolist()
    for k, t in enumerate(ids):
        if t in eos:
            return k + 1
    return len([t for t in ids if t != pad])


def _stop_on_text(tokenizer, start: int, stop: Sequence[str]):
    """Stop a row once its *generated* text contains a stop string (transformers' own ``stop_strings``
    also match across the prompt boundary, e.g. a prompt ending in a newline)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnText(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stop) for t in texts], device=input_ids.device)

    return StoppingCriteriaList([StopOnText()])


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the earliest stop string."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


def stop_ids(tokenizer, model) -> list[int]:
    """The tokenizer's EOS plus the generation config's EOS ids (generation stops at any of them)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    return sorted(i for i in ids if i is not None)


def score_labels(
    model,
    tokenizer,
    prompts: Sequence[str],
    labels: Sequence[str],
    suffix: str,
    batch_size: int = 8,
    advance: Advance = lambda n: None,
):
    """Mean per-token log-probability of each ``label + suffix`` after each prompt.

    Returns a float array of shape (len(prompts), len(labels)). The prompt is run once per
    batch and its KV cache is shared by all candidate labels, so the cost is one prompt pass
    plus a few tokens per label instead of a full pass per (prompt, label) pair.
    """
    import numpy as np
    import torch

    tokenizer.padding_side = "left"
    cand = [tokenizer(label + suffix, add_special_tokens=False)["input_ids"] for label in labels]
    n_lab, t_max = len(cand), max(len(c) for c in cand)
    pad = tokenizer.pad_token_id
    cand_ids = torch.tensor([c + [pad] * (t_max - len(c)) for c in cand])
    cand_mask = torch.tensor([[1] * len(c) + [0] * (t_max - len(c)) for c in cand])
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    scores = np.zeros((len(prompts), n_lab), dtype=np.float64)
    dev = model.device
    for batch in _length_sorted_batches([len(e) for e in encoded], batch_size):
        enc = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(dev)
        b = len(batch)
        with torch.inference_mode():
            positions = (enc["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)  # left padding
            # only the last position's logits are needed: skip the vocabulary projection elsewhere
            out = model(**enc, position_ids=positions, use_cache=True, logits_to_keep=1)
            first_logp = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)  # (b, V)
            cache = out.past_key_values
            cache.batch_repeat_interleave(n_lab)
            prompt_len = enc["attention_mask"].sum(dim=1)  # (b,)
            ids = cand_ids.repeat(b, 1).to(dev)  # (b*n_lab, t_max)
            cmask = cand_mask.repeat(b, 1).to(dev)
            attn = torch.cat([enc["attention_mask"].repeat_interleave(n_lab, dim=0), cmask], dim=1)
            pos = prompt_len.repeat_interleave(n_lab).unsqueeze(1) + torch.arange(t_max, device=dev)
            logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache).logits
            logp = torch.log_softmax(logits.float(), dim=-1)  # (b*n_lab, t_max, V)
            # token k of a candidate is predicted by the prompt's last position (k=0) or candidate pos. k-1
            tok_lp = torch.empty(b * n_lab, t_max, device=dev)
            tok_lp[:, 0] = first_logp.repeat_interleave(n_lab, dim=0).gather(1, ids[:, :1]).squeeze(1)
            if t_max > 1:
                tok_lp[:, 1:] = logp[:, :-1, :].gather(2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            mean = (tok_lp * cmask).sum(1) / cmask.sum(1)
        scores[batch] = mean.view(b, n_lab).cpu().numpy()
        advance(b)
    return scores
