"""Prompt logprobs: each prompt token's log-probability given the tokens before it, and its most probable
alternatives, computed by the prefill's own forward pass (what a harness's loglikelihood of a continuation after a
context needs: ``echo`` with ``logprobs`` on /v1/completions).

The prompt is prefilled in chunks of positions over the growing KV cache, each chunk keeping the logits of every one
of its positions, so that the logits held at once stay within ``SCORED_LOGITS`` whatever the prompt's length and the
vocabulary's size. Logprobs are taken from the model's logits as they are (no sampling settings), in float32, as
transformers' own scoring does. A prompt's first token has none: nothing comes before it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunesmith.generation.engine import Row, TokenLogprob

SCORED_LOGITS = 1 << 24  # logits held at once while prompts are scored (64 MiB in float32)


def chunk_positions(rows: int, vocab: int) -> int:
    """Positions per chunk so that ``rows`` rows' logits over ``vocab`` stay within ``SCORED_LOGITS`` (one at least)."""
    return max(1, SCORED_LOGITS // max(1, rows * vocab))


def scored_prefill(forward: Callable, ids, mask, positions, rows: list[Row], cache, chunk: int):
    """Prefill the left-padded ``ids`` ([rows, width]) through ``forward(ids, mask, positions, cache)`` (which returns
    every position's logits and the cache) ``chunk`` positions at a time, appending to each row's
    ``prompt_token_logprobs`` one entry per prompt token after the first, with the most alternatives any row asks for
    (:func:`own_share` cuts them to a row's own). Returns the last position's logits and the cache, as a plain prefill
    does."""
    width = ids.shape[1]
    logits = None
    for start in range(0, width, chunk):
        end = min(width, start + chunk)
        logits, cache = forward(ids[:, start:end], mask[:, :end], positions[:, start:end], cache)
        _record(rows, logits, ids, start, width)
    return logits[:, -1, :], cache


def _record(rows: list[Row], logits, ids, start: int, width: int) -> None:
    """The logprobs of the tokens that this chunk's positions predict (position p predicts token p + 1), for the
    positions that are each row's own (left padding has none)."""
    import torch

    from tunesmith.generation.engine import TokenLogprob

    targets = ids[:, start + 1:start + 1 + logits.shape[1]]
    n = targets.shape[1]
    if not n:
        return
    logp = torch.log_softmax(logits[:, :n].float(), -1)
    chosen = logp.gather(-1, targets[..., None])[..., 0].tolist()
    k = max(r.prompt_logprobs for r in rows)
    top_v, top_i = logp.topk(k, -1) if k else (None, None)
    top_v, top_i = (top_v.tolist(), top_i.tolist()) if k else (None, None)
    tokens = targets.tolist()
    for b, row in enumerate(rows):
        first = width - len(row.prompt_ids)  # the row's first own position
        for j in range(max(0, first - start), n):
            top = tuple(zip(top_i[b][j], top_v[b][j], strict=True)) if k else ()
            row.prompt_token_logprobs.append(TokenLogprob(tokens[b][j], chosen[b][j], top))


def own_share(entries: list[TokenLogprob], k: int) -> list[TokenLogprob]:
    """A prompt's logprobs with at most ``k`` alternatives per token (rows sharing a prompt may ask for fewer)."""
    from tunesmith.generation.engine import TokenLogprob

    return [e if len(e.top) <= k else TokenLogprob(e.token, e.logprob, e.top[:k]) for e in entries]
