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

    Returns a float array of shape (len(prompts), len(labels)). Prompts run in length-sorted batches of
    up to ``batch_size`` (left-padded, at most ``MAX_BATCH_TOKENS`` tokens); each batch's KV cache is then
    shared by all candidate labels without being copied: the candidates are laid side by side after the
    prompts in chunks of at most ``chunk_tokens`` tokens per batch, each seeing its own prompt and its
    own earlier tokens only (a 4D mask, positions restarting after each prompt), and the cache is cut
    back to the prompts after every chunk. Only positions that predict a candidate token reach the
    vocabulary projection, and the scores stay on the device until the batch is done (no host sync per
    token). Memory is one batch's prompt cache plus one chunk, whatever the number of labels.
    """
    import numpy as np

    cand = [tokenizer(label + suffix, add_special_tokens=False)["input_ids"] for label in labels]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = np.zeros((len(prompts), len(cand)), dtype=np.float64)
    for batch in length_sorted_batches([len(x) for x in ids], batch_size):
        chunks = _candidate_chunks([len(c) for c in cand], max(1, chunk_tokens // len(batch)))
        scores[batch] = _score_batch(model, [ids[i] for i in batch], cand, chunks, pad)
        advance(len(batch))
    return scores


def _score_batch(model, rows: list[list[int]], cand: list[list[int]], chunks: list[list[int]], pad: int):
    """(len(rows), len(cand)) mean log-probabilities for one batch of tokenized prompts."""
    import torch

    from tunesmith.machine.masks import as_kind, mask_kind

    dev, kind = model.device, mask_kind(model)
    width = max(len(r) for r in rows)
    lens = torch.tensor([len(r) for r in rows], device=dev)
    real = torch.arange(width, device=dev)[None] >= (width - lens)[:, None]  # (B, P): left padding is False
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=dev)
    position_ids = (torch.arange(width, device=dev)[None] - (width - lens)[:, None]).clamp(min=0)
    causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril()
    eye = torch.eye(width, dtype=torch.bool, device=dev)
    prompt_mask = (causal & (real[:, None, :] | eye))[:, None]  # a padding query sees itself: no empty softmax row
    with torch.inference_mode():
        out = model(input_ids=input_ids, attention_mask=as_kind(prompt_mask, kind, model.dtype),
                    position_ids=position_ids, use_cache=True, logits_to_keep=1)
        first_logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts each candidate's first token
        cache = out.past_key_values
        total = first_logp[:, [c[0] for c in cand]].double()  # (B, K)
        for chunk in chunks:
            total += _chunk_logp(model, cache, chunk, cand, lens, real, kind)
    counts = torch.tensor([len(c) for c in cand], dtype=torch.float64, device=dev)
    return (total / counts).cpu().numpy()


def _chunk_logp(model, cache, chunk: list[int], cand: list[list[int]], lens, real, kind: str):
    """Summed log-probabilities of the candidates' tokens after the first, (B, K): one forward of the
    chunk over the shared prompt cache, which is cut back to the prompts afterwards."""
    import torch

    from tunesmith.machine.masks import as_kind

    dev = lens.device
    flat, segment, offset, keep, target, owner = [], [], [], [], [], []
    for k, j in enumerate(chunk):
        for p, tok in enumerate(cand[j]):
            if p:  # token p of candidate j is predicted by the position of its token p - 1
                keep.append(len(flat) - 1)
                target.append(tok)
                owner.append(j)
            flat.append(tok)
            segment.append(k)
            offset.append(p)
    rows, n = lens.shape[0], len(flat)
    total = torch.zeros(rows, len(cand), dtype=torch.float64, device=dev)
    if not keep:
        return total
    seg = torch.tensor(segment, device=dev)
    block = (seg[:, None] == seg[None, :]) & torch.ones(n, n, dtype=torch.bool, device=dev).tril()
    mask = torch.cat([real[:, None, None, :].expand(rows, 1, n, real.shape[1]), block.expand(rows, 1, n, n)], dim=-1)
    logits = model(input_ids=torch.tensor([flat], device=dev).expand(rows, n),
                   attention_mask=as_kind(mask, kind, model.dtype),
                   position_ids=lens[:, None] + torch.tensor(offset, device=dev)[None],
                   past_key_values=cache, use_cache=True, logits_to_keep=torch.tensor(keep, device=dev)).logits.float()
    cache.crop(-n)  # drop the chunk's keys and values: the next chunk sees the prompts alone
    tgt = torch.tensor(target, device=dev)
    logp = logits.gather(-1, tgt[None, :, None].expand(rows, -1, 1))[..., 0] - torch.logsumexp(logits, dim=-1)
    return total.index_add_(1, torch.tensor(owner, device=dev), logp.double())



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
