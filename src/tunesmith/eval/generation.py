"""Batched generation (greedy or sampled, optionally constrained) and closed-label log-likelihood scoring.

Both sort prompts by length so that a batch pads to similar lengths (padding to the longest
prompt dominates CPU time otherwise), and return results in the caller's order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Advance = Callable[[int], None]


MAX_BATCH_TOKENS = 8192  # padded tokens in one forward pass: bounds memory for long prompts whatever the batch size


def _length_sorted_batches(lengths: Sequence[int], batch_size: int, max_tokens: int = MAX_BATCH_TOKENS) -> list[list[int]]:
    """Indices sorted longest first, cut into batches of at most ``batch_size`` rows and ``max_tokens``
    padded tokens (a single longer row still gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


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
    chunk_tokens: int = 512,
):
    """Mean per-token log-probability of each ``label + suffix`` after each prompt.

    Returns a float array of shape (len(prompts), len(labels)). Each prompt runs once; its KV cache
    is then shared by all candidate labels without being copied: the candidates are laid side by side
    after the prompt in chunks of at most ``chunk_tokens`` tokens, each seeing the prompt and its own
    earlier tokens only (a 4D block mask, positions restarting after the prompt), and the cache is cut
    back to the prompt after every chunk. Memory is one prompt's cache plus one chunk, whatever the
    number of labels (10, 77 or 500); ``batch_size`` is accepted for the callers' uniformity.
    """
    import numpy as np
    import torch

    from tunesmith.train.packing import block_causal_mask
    from tunesmith.train.sft import mask_kind

    cand = [tokenizer(label + suffix, add_special_tokens=False)["input_ids"] for label in labels]
    chunks = _candidate_chunks([len(c) for c in cand], chunk_tokens)
    kind = mask_kind(model)
    scores = np.zeros((len(prompts), len(cand)), dtype=np.float64)
    dev = model.device
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids], device=dev), use_cache=True, logits_to_keep=1)
            first_logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # predicts each candidate's first token
            cache, n = out.past_key_values, len(ids)
            for chunk in chunks:
                flat = [t for j in chunk for t in cand[j]]
                segment = torch.tensor([[k for k, j in enumerate(chunk) for _ in cand[j]]], device=dev)
                pos = torch.tensor([[n + p for j in chunk for p in range(len(cand[j]))]], device=dev)
                block = block_causal_mask(segment, "bool")
                mask = torch.cat([torch.ones(1, 1, len(flat), n, dtype=torch.bool, device=dev), block], dim=-1)
                if kind == "float":
                    mask = torch.zeros(mask.shape, dtype=model.dtype, device=dev).masked_fill(~mask, torch.finfo(model.dtype).min)
                logits = model(input_ids=torch.tensor([flat], device=dev), attention_mask=mask, position_ids=pos,
                               past_key_values=cache, use_cache=True).logits[0].float()
                cache.crop(-len(flat))  # drop the chunk's keys and values: the next chunk sees the prompt alone
                logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
                start = 0
                for j in chunk:
                    c = cand[j]
                    lp = [first_logp[c[0]].item()] + [logp[start + k - 1, c[k]].item() for k in range(1, len(c))]
                    scores[i, j] = sum(lp) / len(lp)
                    start += len(c)
        advance(1)
    return scores


def _candidate_chunks(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive candidate indices grouped so that each group holds at most ``budget`` tokens (or one candidate)."""
    chunks: list[list[int]] = [[]]
    used = 0
    for j, n in enumerate(lengths):
        if chunks[-1] and used + n > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(j)
        used += n
    return chunks
