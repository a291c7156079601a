"""Closed-label scoring: the mean token log-likelihood of each candidate label after each prompt.

Used by evaluation beside free generation: it is fair to a base model that never learned the answer
format. ``length_sorted_batches`` groups prompts of similar length for scoring passes that pad.
"""

from __future__ import annotations

from collections.abc import Sequence

from tunesmith.generation.batch import MAX_BATCH_TOKENS, Advance


def length_sorted_batches(lengths: Sequence[int], batch_size: int, max_tokens: int = MAX_BATCH_TOKENS) -> list[list[int]]:
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

    from tunesmith.train.packing import block_causal_mask, mask_kind

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
