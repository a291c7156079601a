"""A list of prompts through the continuous-batching engine: evaluation (greedy by default) and
local synthesis (sampled, ``n`` per prompt, optionally under a JSON schema).

Prompts are queued longest first, so that rows sharing the batch have similar lengths (padding to the
longest prompt dominates CPU time otherwise); results come back in the caller's order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from tunesmith.generation.engine import ContinuousBatch, Row
from tunesmith.generation.sampling import GenParams, cut_at_stop

Advance = Callable[[int], None]

MAX_BATCH_TOKENS = 8192  # tokens in one batch, padding included (KV cache cells when generating): bounds memory


@dataclass
class Generated:
    """The ``n`` completions of one prompt and its token counts (padding and end-of-turn tokens excluded);
    ``ids``: each completion's tokens, ending with the end-of-sequence token that stopped it (a trainer scores
    that token too)."""

    texts: list[str]
    prompt_tokens: int
    completion_tokens: int
    ids: list[list[int]] = field(default_factory=list)


@dataclass
class Prompt:
    """One prompt to complete ``n`` times with its own settings, adapter and (optionally) constraint.

    ``constraint(rows, prompt_len)`` returns a fresh transformers ``LogitsProcessor`` for that many rows
    of one prompt (e.g. a JSON-schema mask); the engine asks for one per row.
    """

    ids: list[int]
    params: GenParams = field(default_factory=GenParams)
    n: int = 1
    adapter: str | None = None
    constraint: Callable[[int, int], object] | None = None

    def rows(self) -> list[Row]:
        """The prompt's ``n`` rows; choice ``j`` of a seeded prompt draws with seed + j."""
        out = []
        for j in range(self.n):
            p = self.params
            params = p if p.seed is None else replace(p, seed=p.seed + j)
            extra = (self.constraint(1, len(self.ids)),) if self.constraint is not None else ()
            out.append(Row(self.ids, params, self.adapter, extra))
        return out


def complete(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    batch_size: int = 16,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
    on_done: Callable[[int, Generated], None] = lambda i, g: None,
) -> list[Generated]:
    """Every prompt's completions; ``on_done(i, generated)`` is called as soon as prompt ``i``'s rows are all done.
    A remote model (:class:`tunesmith.generation.remote.RemoteModel`) completes them on its server."""
    if getattr(type(model), "remote", False):
        return model.complete(prompts, on_done)
    batch = ContinuousBatch(model, tokenizer, max_rows=batch_size, max_cache_tokens=max_batch_tokens)
    owner: dict[Row, int] = {}
    rows: list[list[Row]] = [[] for _ in prompts]
    for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i].ids)):
        for row in prompts[i].rows():
            owner[row] = i
            rows[i].append(row)
            batch.add(row)
    left = [p.n for p in prompts]
    out: list[Generated | None] = [None] * len(prompts)
    while batch.busy:
        for row in batch.step():
            i = owner[row]
            left[i] -= 1
            if left[i] == 0:
                out[i] = _generated(batch, prompts[i], rows[i])
                on_done(i, out[i])
    return out  # type: ignore[return-value]


def _generated(batch: ContinuousBatch, prompt: Prompt, rows: list[Row]) -> Generated:
    texts = [cut_at_stop(batch.text(r), prompt.params.stop) for r in rows]
    ids = [r.generated + ([r.stop_token] if r.stop_token is not None else []) for r in rows]
    return Generated(texts, len(prompt.ids), sum(len(r.generated) for r in rows), ids)


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
    adapters: Sequence[str | None] | None = None,
) -> list[Generated]:
    """Completions of prompt strings (special tokens already in them), all with the same settings: greedy when
    ``temperature`` is 0, else sampled, ``n`` per prompt. ``adapters``: one adapter name per prompt (None: the
    model as it is); ``stop`` strings end a row and are cut from its text with anything after them."""
    params = GenParams(max_new_tokens, temperature, top_p, tuple(stop), seed)
    names = adapters if adapters is not None else [None] * len(prompts)
    items = [Prompt(tokenizer(p, add_special_tokens=False)["input_ids"], params, n, a, constraint)
             for p, a in zip(prompts, names, strict=True)]
    return complete(model, tokenizer, items, batch_size, on_done=lambda i, g: advance(1))


def generate_greedy(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 16,
    advance: Advance = lambda n: None,
    stop: Sequence[str] = (),
    adapters: Sequence[str | None] | None = None,
) -> list[str]:
    """Greedy completions for chat-formatted prompt strings, as evaluation asks them."""
    rows = generate(model, tokenizer, prompts, max_new_tokens, batch_size, advance=advance, stop=stop, adapters=adapters)
    return [r.texts[0] for r in rows]
