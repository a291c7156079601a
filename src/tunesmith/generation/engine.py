"""Continuous batching over one model: rows join the running batch between two decoding steps and
leave it as soon as they finish, so a short row is never held behind a long one and a finished row
never costs another forward pass.

Joining rows' prompts are prefilled in groups of similar length (left-padded within a group: every
padding token costs a full forward pass), then their KV caches are appended to the batch's, every side
left-padded to a common width; when rows leave, cache columns that are padding for every remaining row
are dropped. Rows that share a prompt and an adapter (``n`` samples of one prompt, a GRPO group) are
prefilled once and the prompt's cache is copied to each. Each row has its own adapter (PEFT's
``adapter_names`` routes every row of a forward pass through its own LoRA), its own settings and its own
sampler, so rows for different models and settings share every forward pass. Nothing here is threaded: a
caller drives :meth:`ContinuousBatch.step` (evaluation and synthesis in a loop, the server from its engine thread).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from tunesmith.errors import ModelError
from tunesmith.generation.logprobs import (
    TokenLogprob,
    chunk_positions,
    logprobs_before_processors,
    own_share,
    record_logprobs,
    scored_prefill,
)
from tunesmith.generation.sampling import GenParams, has_stop, row_sampler, stop_ids

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass(eq=False)
class Row:
    """One generation: its prompt, settings and adapter, and what it has generated so far.

    ``adapter``: a loaded PEFT adapter's name, ``BASE`` for the bare base model, or None for the model as
    it is (its active adapter, if any). ``processors``: extra logits processors for this row only (e.g. a
    JSON-schema mask), run before temperature and top-p. ``deadline``: a ``time.monotonic()`` after which
    the row ends with "length". A row with ``max_tokens`` 0 (its prompt scored alone) ends at its prefill.
    """

    prompt_ids: list[int]
    params: GenParams = GenParams()
    adapter: str | None = None
    processors: Sequence = ()
    deadline: float | None = None
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" once finished
    stop_token: int | None = None  # the end-of-sequence token that stopped the row (not in ``generated``)
    sampler: object = field(default=None, repr=False)  # a RowSampler, None for plain greedy rows
    logprobs: int | None = None  # report each generated token's log-probability and this many top alternatives
    token_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per generated token, when asked
    end_logprob: TokenLogprob | None = None  # the end-of-sequence token that stopped the row, when logprobs are asked
    prompt_logprobs: int | None = None  # score the prompt too: each token's logprob and this many top alternatives
    prompt_token_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per prompt token after the first
    error: BaseException | None = None  # why this row failed alone (finish_reason "error"; isolate_rows only)

    @property
    def abandoned(self) -> bool:
        """True when nobody waits for this row any more (it then leaves without an answer)."""
        return False

    @property
    def position(self) -> int:
        """Position of the last generated token (the input of the next step)."""
        return len(self.prompt_ids) + len(self.generated) - 1


class ContinuousBatch:
    """Rows in flight over one model and their shared KV cache.

    ``add`` queues a row; each ``step`` admits the waiting rows that fit (in order: one that does not
    fit waits at the head of the line), prefills them, runs one decoding step for every active row and
    returns the rows that finished. The batch stays within ``max_rows`` rows and ``max_cache_tokens`` cache
    cells (rows x columns, padding included, up to the last token any row may still generate).

    With ``isolate_rows`` (a server's batch, whose rows belong to different callers) a row whose own part of a
    step fails (its sampler's seed, its logits processors such as a JSON-schema matcher) ends alone with
    ``finish_reason`` "error" and its exception in ``error``; every other row goes on. Without it (evaluation,
    synthesis: one caller) the exception ends the step, as any other failure does.
    """

    def __init__(self, model, tokenizer, max_rows: int = 16, max_cache_tokens: int = 65_536,
                 isolate_rows: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.isolate_rows = isolate_rows
        self.max_rows, self.max_cache_tokens = max_rows, max_cache_tokens
        self.context_length = int(getattr(model.config, "max_position_embeddings", 2048))
        self.eos_ids = set(stop_ids(tokenizer, model))
        self.waiting: deque[Row] = deque()
        self.joining: list[Row] = []  # admitted this step, not yet in the cache
        self.active: list[Row] = []
        self.cache = None  # the batch's KV cache: one row per active row, left-padded
        self.mask = None  # [rows, columns] attention mask of the cache
        self.paused: list[_Paused] = []  # rows taken out of the steps, each group with its own cache
        self.decoded_last = False  # the last step ran a decoding step

    @property
    def busy(self) -> bool:
        return bool(self.active or self.waiting or self.paused)

    @property
    def paused_rows(self) -> list[Row]:
        return [row for group in self.paused for row in group.rows]

    def add(self, row: Row) -> None:
        self.waiting.append(row)

    def step(self) -> list[Row]:
        """Admit and prefill waiting rows, then one decoding step for all; the rows that finished, in order.
        A step whose prefill follows a step that decoded the rows in flight ends after the prefill: rows that end at
        their first token (a label, a one-word answer) are answered without waiting for a decoding step of every row
        in flight (on a CPU as long as their own prefill), and the next step decodes them all, so two steps in a row
        never both skip the decoding."""
        finished: list[Row] = []
        in_flight = bool(self.active)
        self.joining = self._admit()
        joined = bool(self.joining)
        if joined:
            finished += self._prefill(self.joining)
        self.joining = []
        decode = bool(self.active) and not (joined and in_flight and self.decoded_last)
        if decode:
            finished += self._decode_step()
        self.decoded_last = decode
        return finished

    def abort(self) -> list[Row]:
        """Drop the rows in flight (after a failed step) and return them; waiting rows stay in line."""
        rows = [*self.active, *self.joining, *self.paused_rows]
        self._reset()
        self.joining, self.paused = [], []
        return rows

    # --- pausing ----------------------------------------------------------------------------

    def pause(self, rows: Sequence[Row]) -> None:
        """Take these active rows out of the steps, their KV cache kept aside (:meth:`resume` puts them back exactly
        where they were): a server's share of the batch shrinks without losing any row's work."""
        import torch

        chosen = {id(r) for r in rows}
        take = [i for i, r in enumerate(self.active) if id(r) in chosen]
        if not take:
            return
        index = torch.tensor(take, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(0).nonzero()
        start = int(used[0]) if len(used) else 0
        kv = [(layer.keys.index_select(0, index)[:, :, start:], layer.values.index_select(0, index)[:, :, start:])
              for layer in self.cache.layers]
        self.paused.append(_Paused([self.active[i] for i in take], kv, mask[:, start:]))
        taken = set(take)
        self._select([i for i in range(len(self.active)) if i not in taken])

    def resume(self, rows: Sequence[Row]) -> None:
        """Put paused rows back into the steps (rows not paused are ignored)."""
        chosen = {id(r) for r in rows}
        back, self.paused = _split_paused(self.paused, lambda r: id(r) in chosen)
        if back:
            self._join([(g.mask, g.kv, g.rows) for g in back])

    def drop_paused(self, keep) -> list[Row]:
        """Forget the paused rows for which ``keep(row)`` is false (nobody waits for them); returns them."""
        gone, self.paused = _split_paused(self.paused, lambda r: not keep(r))
        return [r for g in gone for r in g.rows]

    # --- admission ------------------------------------------------------------------------

    def _admit(self) -> list[Row]:
        rows: list[Row] = []
        while self.waiting:
            row = self.waiting[0]
            if row.abandoned:
                self.waiting.popleft()
                continue
            if not self._fits(rows, row):
                break
            rows.append(self.waiting.popleft())
        return rows

    def _fits(self, joining: list[Row], row: Row) -> bool:
        """Would the batch, with ``row``, stay within max_rows rows and, up to the last token any row may still
        generate, within max_cache_tokens cache cells? A lone row always runs."""
        if not self.active and not joining:
            return True
        rows = [*self.active, *joining, row]
        width = max(self.mask.shape[1] if self.mask is not None else 0, *(len(r.prompt_ids) for r in rows))
        remaining = max(r.params.max_tokens - len(r.generated) for r in rows)
        return len(rows) <= self.max_rows and len(rows) * (width + remaining) <= self.max_cache_tokens

    # --- forward passes ---------------------------------------------------------------------

    def _forward(self, input_ids, mask, positions, rows: list[Row], cache, every_position: bool = False):
        """The model over ``input_ids``: the last position's logits ([rows, vocab]; with ``every_position``, every
        position's: [rows, positions, vocab]) and the cache."""
        import torch

        kw = {}
        names = self._adapter_names(rows)
        if names is not None:
            kw["adapter_names"] = names
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True, logits_to_keep=0 if every_position else 1, **kw)
        return (out.logits.float() if every_position else out.logits[:, -1, :].float()), out.past_key_values

    def _scored_prefill(self, ids, mask, positions, rows: list[Row]):
        """A prefill that records each row's prompt logprobs (:mod:`tunesmith.generation.logprobs`)."""
        from transformers import DynamicCache

        def forward(chunk_ids, chunk_mask, chunk_positions, cache):
            return self._forward(chunk_ids, chunk_mask, chunk_positions, rows, cache, every_position=True)

        chunk = chunk_positions(len(rows), self.model.config.vocab_size)
        return scored_prefill(forward, ids, mask, positions, rows, DynamicCache(), chunk)

    def _adapter_names(self, rows: list[Row]) -> list[str] | None:
        """PEFT's per-row adapter names, or None when every row runs the model as it is."""
        if all(r.adapter is None for r in rows):
            return None
        if not hasattr(self.model, "peft_config"):
            named = sorted({r.adapter for r in rows if r.adapter not in (None, BASE)})
            if named:
                raise ModelError(f"adapter {named[0]!r} asked for, but the model has no adapters loaded")
            return None
        active = getattr(self.model, "active_adapter", BASE)
        return [r.adapter if r.adapter is not None else active for r in rows]

    def _prefill(self, rows: list[Row]) -> list[Row]:
        """Prefill the joining rows in groups of similar prompt length (padding costs a forward pass its full
        price), take each row's first token and merge the survivors into the batch in one concatenation. Rows that
        score their prompt are grouped apart: their pass keeps every position's logits."""
        finished: list[Row] = []
        parts = []
        for kind in ([r for r in rows if r.prompt_logprobs is None], [r for r in rows if r.prompt_logprobs is not None]):
            for group in prefill_groups([len(r.prompt_ids) for r in kind]):
                members = [kind[i] for i in group]
                cache, mask, keep = self._prefill_group(members, finished)
                if keep:
                    parts.append(([members[i] for i in keep], cache, mask, keep))
        if parts:
            self._merge(parts)
        return finished

    def _prefill_group(self, rows: list[Row], finished: list[Row]):
        """One left-padded forward pass over these prompts, each distinct (prompt, adapter) once, its cache and
        last logits (and prompt logprobs, for rows that score their prompt) copied to every row that shares it;
        returns the cache, mask and the rows that go on."""
        import torch
        from transformers import DynamicCache

        device = self.model.device
        firsts, owner = shared_prompts(rows)
        distinct = [rows[i] for i in firsts]
        width = max(len(r.prompt_ids) for r in distinct)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in distinct], device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in distinct],
                            device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        for r in rows:
            r.sampler = self._row_part(r, row_sampler, r.params, r.processors, len(r.prompt_ids))
        if distinct[0].prompt_logprobs is None:
            logits, cache = self._forward(ids, mask, positions, distinct, DynamicCache())
        else:
            logits, cache = self._scored_prefill(ids, mask, positions, distinct)
            for r, o in zip(rows, owner, strict=True):
                r.prompt_token_logprobs = own_share(distinct[o].prompt_token_logprobs, r.prompt_logprobs)
        if len(distinct) < len(rows):
            index = torch.tensor(owner, device=device)
            logits, mask = logits.index_select(0, index), mask.index_select(0, index)
            cache.batch_select_indices(index)
        keep, done = self._advance(rows, logits)
        finished += done
        return cache, mask, keep

    def _decode_step(self) -> list[Row]:
        import torch

        device = self.model.device
        ids = torch.tensor([[r.generated[-1]] for r in self.active], device=device)
        self.mask = torch.cat([self.mask, torch.ones((len(self.active), 1), dtype=self.mask.dtype, device=device)], 1)
        positions = torch.tensor([[r.position] for r in self.active], device=device)
        logits, self.cache = self._forward(ids, self.mask, positions, self.active, self.cache)
        keep, finished = self._advance(self.active, logits)
        if len(keep) < len(self.active):
            self._select(keep)
        return finished

    # --- tokens -----------------------------------------------------------------------------

    def _advance(self, rows: list[Row], logits) -> tuple[list[int], list[Row]]:
        """Append each row's next token. Returns the indices of rows that go on, and the rows that finished
        (abandoned rows are in neither)."""
        wanted, logp = logprobs_before_processors(rows, logits)
        tokens = self._next_tokens(rows, logits)
        ends = [self.ends(row) for row in rows]
        record_logprobs(rows, wanted, logp, tokens, ends)
        now = time.monotonic()
        keep, finished = [], []
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            if row.abandoned:
                continue
            if row.error is not None:
                row.finish_reason = "error"
                finished.append(row)
                continue
            if not row.params.max_tokens:  # its prompt scored alone: nothing is generated
                row.finish_reason = "length"
                finished.append(row)
                continue
            finish = "stop" if token in ends[i] else None
            if finish is not None:
                row.stop_token = token
            else:
                row.generated.append(token)
                finish = self._limit_reached(row, now)
            if finish is None:
                keep.append(i)
            else:
                row.finish_reason = finish
                finished.append(row)
        return keep, finished

    def ends(self, row: Row):
        """The tokens that end ``row``: its own ``stop_token_ids`` when it names them, else the model's ends."""
        ids = row.params.stop_token_ids
        return self.eos_ids if ids is None else ids

    def _next_tokens(self, rows: list[Row], logits) -> list[int]:
        """One batched argmax for greedy rows; rows with processors or sampling go through their own sampler."""
        tokens = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            if row.sampler is not None and row.error is None:
                token = self._row_part(row, row.sampler, row.prompt_ids + row.generated, logits[i : i + 1])
                tokens[i] = tokens[i] if token is None else token
        return tokens

    def _row_part(self, row: Row, fn, *args):
        """``fn(*args)``, a part of the step that is one row's own; with ``isolate_rows`` a failure ends that row
        alone (its ``error``), without, it ends the step."""
        if not self.isolate_rows:
            return fn(*args)
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - the row's own failure, answered to its caller
            row.error = exc
            return None

    def _limit_reached(self, row: Row, now: float) -> str | None:
        """'stop' at a stop string; 'length' at max_tokens, the end of the context or the row's deadline."""
        if row.params.stop and has_stop(self.text(row), row.params.stop):
            return "stop"
        full = len(row.prompt_ids) + len(row.generated) >= self.context_length
        late = row.deadline is not None and now > row.deadline
        if len(row.generated) >= row.params.max_tokens or full or late:
            return "length"
        return None

    def text(self, row: Row) -> str:
        """The row's generated text so far (special tokens left out)."""
        return self.tokenizer.decode(row.generated, skip_special_tokens=True)

    # --- the batch's KV cache -----------------------------------------------------------------

    def _merge(self, parts: list[tuple[list[Row], object, object, list[int]]]) -> None:
        """Append prefilled groups ``(rows, cache, mask, kept indices)`` to the running batch: one concatenation
        per layer, every side's cache columns left-padded to the widest."""
        import torch

        pieces = []  # (mask, [(keys, values) per layer], rows)
        for rows, cache, mask, keep in parts:
            index = torch.tensor(keep, device=mask.device)
            kv = [(layer.keys.index_select(0, index), layer.values.index_select(0, index)) for layer in cache.layers]
            pieces.append((mask.index_select(0, index), kv, rows))
        self._join(pieces, parts[0][1])

    def _join(self, pieces: list[tuple], spare_cache=None) -> None:
        """Append ``(mask, [(keys, values) per layer], rows)`` pieces to the running batch: one concatenation per
        layer, every side's cache columns left-padded to the widest. ``spare_cache``: a cache object to fill when the
        batch has none (else one is made)."""
        import torch
        from transformers import DynamicCache

        if self.cache is not None:
            pieces = [(self.mask, [(layer.keys, layer.values) for layer in self.cache.layers], self.active), *pieces]
        width = max(mask.shape[1] for mask, _, _ in pieces)
        target = self.cache if self.cache is not None else spare_cache
        if target is None:
            target = DynamicCache(ddp_cache_data=pieces[0][1])
        self.mask = torch.cat([_left_pad(mask, width, -1) for mask, _, _ in pieces], 0)
        for i, layer in enumerate(target.layers):
            layer.keys = torch.cat([_left_pad(kv[i][0], width, -2) for _, kv, _ in pieces], 0)
            layer.values = torch.cat([_left_pad(kv[i][1], width, -2) for _, kv, _ in pieces], 0)
        self.cache = target
        self.active = [row for _, _, rows in pieces for row in rows]

    def _select(self, keep: list[int]) -> None:
        """Keep only these rows; drop cache columns that are padding for every remaining row."""
        import torch

        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        used = self.mask.any(0).nonzero()
        start = int(used[0]) if len(used) else 0
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self.active = [self.active[i] for i in keep]

    def _reset(self) -> None:
        self.active, self.cache, self.mask = [], None, None


@dataclass(eq=False)
class _Paused:
    """Rows taken out of the steps, with their part of the KV cache (``[(keys, values)]`` per layer) and mask."""

    rows: list[Row]
    kv: list[tuple]
    mask: object

    def subset(self, indices: list[int]) -> _Paused:
        import torch

        index = torch.tensor(indices, device=self.mask.device)
        return _Paused([self.rows[i] for i in indices], [(k.index_select(0, index), v.index_select(0, index))
                                                         for k, v in self.kv], self.mask.index_select(0, index))


def _split_paused(groups: list[_Paused], chosen) -> tuple[list[_Paused], list[_Paused]]:
    """(the paused rows ``chosen(row)`` picks, the others), each as groups with their own cache."""
    picked, kept = [], []
    for group in groups:
        take = [i for i, r in enumerate(group.rows) if chosen(r)]
        if len(take) == len(group.rows):
            picked.append(group)
        elif not take:
            kept.append(group)
        else:
            picked.append(group.subset(take))
            kept.append(group.subset([i for i in range(len(group.rows)) if i not in set(take)]))
    return picked, kept


def prefill_groups(lengths: Sequence[int], waste: float = 0.25) -> list[list[int]]:
    """Indices grouped for prefill, longest first: a row joins the current group while the group's padded
    tokens stay within ``1 + waste`` times its real tokens (a few short prompts still share one pass)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        group = groups[-1] if groups else None
        if group and lengths[group[0]] * (len(group) + 1) <= (1 + waste) * (sum(lengths[j] for j in group) + lengths[i]):
            group.append(i)
        else:
            groups.append([i])
    return groups


def shared_prompts(rows: Sequence[Row]) -> tuple[list[int], list[int]]:
    """The first row of each distinct (prompt, adapter) among ``rows``, and for every row the index of its
    prompt among those firsts."""
    firsts: list[int] = []
    seen: dict[tuple, int] = {}
    owner = []
    for i, r in enumerate(rows):
        key = (r.adapter, tuple(r.prompt_ids))
        if key not in seen:
            seen[key] = len(firsts)
            firsts.append(i)
        owner.append(seen[key])
    return firsts, owner


def _left_pad(t, width: int, dim: int):
    """Zeros before ``t`` along ``dim`` up to ``width``."""
    import torch

    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim)
