"""Mean loss and perplexity of reference answers given their prompts (held-out text).

A contender that has learned the domain puts more probability on the gold answers; unlike
accuracy this needs no parsing and also works for free-form answers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tunesmith.generation import Advance, length_sorted_batches


def answer_losses(
    model,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 8,
    advance: Advance = lambda n: None,
) -> list[tuple[float, int]]:
    """Per example: (sum of token negative log-likelihoods of the answer, number of answer tokens)."""
    import torch

    pad = tokenizer.pad_token_id
    seqs, n_prompt = [], []
    for p, a in zip(prompts, answers, strict=True):
        pi = tokenizer(p, add_special_tokens=False)["input_ids"]
        ai = tokenizer(a, add_special_tokens=False)["input_ids"]
        seqs.append(pi + ai)
        n_prompt.append(len(pi))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
    for batch in length_sorted_batches([len(s) for s in seqs], batch_size):
        width = max(len(seqs[i]) for i in batch)
        ids = torch.tensor([seqs[i] + [pad] * (width - len(seqs[i])) for i in batch], device=model.device)
        mask = torch.tensor(
            [[1] * len(seqs[i]) + [0] * (width - len(seqs[i])) for i in batch], device=model.device
        )
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        tok = logp[:, :-1, :].gather(2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # log p(token t+1 | ..t)
        for row, i in enumerate(batch):
            start, end = n_prompt[i] - 1, len(seqs[i]) - 1  # predictions of the answer tokens
            out[i] = (float(-tok[row, start:end].sum()), end - start)
        advance(len(batch))
    return out


def summarize(losses: Sequence[tuple[float, int]]) -> dict:
    """Token-weighted mean loss and its perplexity."""
    total, tokens = sum(s for s, _ in losses), sum(n for _, n in losses)
    mean = total / tokens if tokens else float("nan")
    return {"mean_loss": mean, "perplexity": math.exp(mean) if tokens else None}


def gold_label_losses(scores, tokenizer, labels: Sequence[str], suffix: str, gold: Sequence[str]) -> list[tuple[float, int]] | None:
    """:func:`answer_losses` of the gold labels read off label scores (each the mean token log-likelihood of
    ``label + suffix`` after the prompt: the very tokens the answer-loss pass scores), so that pass need not
    run again; None when a gold answer is not one of the labels."""
    index = {label: j for j, label in enumerate(labels)}
    if any(g not in index for g in gold):
        return None
    n = [len(tokenizer(label + suffix, add_special_tokens=False)["input_ids"]) for label in labels]
    return [(-float(scores[i, index[g]]) * n[index[g]], n[index[g]]) for i, g in enumerate(gold)]
