"""Token logprobs: a token's log-probability and its most probable alternatives (:class:`TokenLogprob`, of a generated
token or a prompt token), and prompt logprobs: each prompt token's given the tokens before it, computed by the
prefill's own forward pass (what a harness's loglikelihood of a continuation after a context needs: ``echo`` with
``logprobs`` on /v1/completions).

The prompt is prefilled in chunks of positions over the growing KV cache, each chunk keeping the logits of every one
of its positions, so that the logits held at once stay within ``SCORED_LOGITS`` whatever the prompt's length and the
vocabulary's size. Logprobs are taken from the model's logits as they are (no sampling settings), in float32, as
transformers' own scoring does. A prompt's first token has none: nothing comes before it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

SCORED_LOGITS = 1 << 24  # logits held at once while prompts are scored (64 MiB in float32)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (before temperature, penalties or a schema mask, as vLLM reports
    them) and the ``top`` most probable tokens at that step: ``(token id, logprob)``."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def logprobs_before_processors(rows: list, logits):
    """The rows that asked for logprobs (and generate) and their log-softmax, taken before any processor (a schema
    mask, penalties, temperature) changes the logits in place."""
    wanted = [i for i, r in enumerate(rows) if r.logprobs is not None and r.params.max_tokens]
    if not wanted:
        return wanted, None
    import torch

    return wanted, torch.log_softmax(logits[wanted].float(), -1)


def record_logprobs(rows: list, wanted: list[int], logp, tokens: list[int], ends: list) -> None:
    """Append each generated token's logprob (and top alternatives) to the rows that asked for them; the end of
    sequence that stops a row (one of ``ends[i]``, row i's end tokens) is not one of its tokens, and is kept apart
    (``end_logprob``)."""
    if not wanted:
        return
    import torch

    k = max(rows[i].logprobs for i in wanted)
    top_v, top_i = logp.topk(k, -1) if k else (None, None)
    chosen = logp[torch.arange(len(wanted)), torch.tensor([tokens[i] for i in wanted])].tolist()
    for j, i in enumerate(wanted):
        n = rows[i].logprobs
        top = tuple(zip(top_i[j, :n].tolist(), top_v[j, :n].tolist(), strict=True)) if n else ()
        if tokens[i] in ends[i]:
            rows[i].end_logprob = TokenLogprob(tokens[i], chosen[j], top)
        else:
            rows[i].token_logprobs.append(TokenLogprob(tokens[i], chosen[j], top))


def chunk_positions(rows: int, vocab: int) -> int:
    """Positions per chunk so that ``rows`` rows' logits over ``vocab`` stay within ``SCORED_LOGITS`` (one at least)."""
    return max(1, SCORED_LOGITS // max(1, rows * vocab))


def scored_prefill(forward: Callable, ids, mask, positions, rows: list, cache, chunk: int):
    """Prefill the left-padded ``ids`` ([rows, width]; ``rows``: the engine's rows) through ``forward(ids, mask,
    positions, cache)`` (every position's logits and the cache) ``chunk`` positions at a time, appending to each row's
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


def _record(rows: list, logits, ids, start: int, width: int) -> None:
    """The logprobs of the tokens that this chunk's positions predict (position p predicts token p + 1), for the
    positions that are each row's own (left padding has none)."""
    import torch

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
    return [e if len(e.top) <= k else TokenLogprob(e.token, e.logprob, e.top[:k]) for e in entries]
