"""Generation engine for the server: one base model, any number of named LoRA adapters, and
continuous batching.

A background thread runs one decoding step at a time for every row in flight. Rows join the
running batch between two steps (their prompts are prefilled together, then their KV cache is
appended to the batch's, left-padded to a common length) and leave it as soon as they finish,
are cancelled (the client went away) or run past their deadline, so a short request is never
held behind a long one. Each row keeps its own sampling state (temperature, top_p and a seeded
generator), and PEFT routes each row through its own adapter (``adapter_names``), so requests
for different models and settings share every forward pass.

Requests are made from the event loop (``submit``) and read back as an async stream of
``(choice index, text delta | Generation)``.
"""

from __future__ import annotations

import asyncio
import queue
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.generation import cut_at_stop, stop_ids
from tunesmith.serve.errors import APIError

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass(frozen=True)
class GenParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


class Request:
    """The ``n`` generations of one API request, read from the event loop that submitted them."""

    def __init__(self, n: int, loop: asyncio.AbstractEventLoop):
        self.n, self.loop = n, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def push(self, index: int, item) -> None:
        """Called by the engine thread: a text delta, the final Generation, or an exception."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, item))
        except RuntimeError:  # the loop is gone: nobody is listening any more
            self.cancelled.set()

    def cancel(self) -> None:
        """Stop generating for this request; its rows leave the batch before the next step."""
        self.cancelled.set()

    async def events(self) -> AsyncIterator[tuple[int, str | Generation]]:
        finished = 0
        while finished < self.n:
            i, item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield i, item
            finished += isinstance(item, Generation)

    async def results(self) -> list[Generation]:
        out: list[Generation | None] = [None] * self.n
        async for i, item in self.events():
            if isinstance(item, Generation):
                out[i] = item
        return out  # type: ignore[return-value]


@dataclass
class _Row:
    """One generation in flight."""

    request: Request
    index: int
    adapter: str
    prompt_ids: list[int]
    params: GenParams
    stream: bool
    deadline: float
    rng: object = None  # torch.Generator for sampled rows
    generated: list[int] = field(default_factory=list)
    sent: str = ""  # text already streamed

    @property
    def position(self) -> int:
        """Position of the last generated token (the input of the next step)."""
        return len(self.prompt_ids) + len(self.generated) - 1


class Engine:
    def __init__(self, base: str, adapters: dict[str, str | Path] | None = None, max_batch: int = 16,
                 wait_ms: float = 15.0, precision: str = "auto", request_timeout_s: float = 300.0,
                 max_batch_tokens: int = 65_536):
        from tunesmith.models.loading import load_model, load_tokenizer, pick_placement

        self.base_name = base
        self.tokenizer = load_tokenizer(base)
        self.model = load_model(base, pick_placement(precision))
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.adapters: dict[str, str] = {}
        self.heads: dict[str, object] = {}  # model id -> HeadPredictor (classifier, regression, span heads)
        self.max_batch, self.wait_s, self.request_timeout_s = max_batch, wait_ms / 1000, request_timeout_s
        self.max_batch_tokens = max_batch_tokens  # bounds the KV cache: rows x columns, padding included
        self.backlog: deque[_Row] = deque()  # rows taken from the queue that did not fit the batch yet
        self.lock = threading.Lock()
        self.pending: queue.Queue[_Row | None] = queue.Queue()
        self.eos_ids = set(stop_ids(self.tokenizer, self.model))
        self.active: list[_Row] = []
        self.cache = None  # the batch's KV cache: one row per active row, left-padded
        self.mask = None  # [rows, columns] attention mask of the cache
        self.closed = False
        for name, path in (adapters or {}).items():
            self.add_adapter(name, path)
        self.worker = threading.Thread(target=self._loop, name="tunesmith-engine", daemon=True)
        self.worker.start()

    # --- models ---------------------------------------------------------------------------

    def model_ids(self) -> list[str]:
        return [self.base_name, *self.adapters, *self.heads]

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Load a LoRA adapter under ``name`` (the model id clients ask for); a trained head folder is
        loaded beside the base model and answers through :mod:`tunesmith.serve.heads`."""
        from peft import PeftModel

        from tunesmith.serve.heads import is_head_folder, load_head

        if is_head_folder(path):
            if name not in self.heads:
                self.heads[name] = load_head(path, self.base_name)
            return
        with self.lock:
            if name in self.adapters:
                return
            if not self.adapters:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
            else:
                self.model.load_adapter(str(path), adapter_name=name)
            self.model.eval()
            self.adapters[name] = str(path)

    # --- requests -------------------------------------------------------------------------

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def submit(self, model_id: str, prompt_ids: list[int], params: list[GenParams], stream: bool = False) -> Request:
        """Queue one generation per ``params`` entry (the request's ``n`` choices); call from the event loop."""
        import torch

        if self.closed:
            raise _shutting_down()
        request = Request(len(params), asyncio.get_running_loop())
        adapter = BASE if model_id == self.base_name else model_id
        deadline = time.monotonic() + self.request_timeout_s
        for i, p in enumerate(params):
            rng = None
            if not p.greedy:
                rng = torch.Generator().manual_seed(p.seed if p.seed is not None else random.getrandbits(63))
            self.pending.put(_Row(request, i, adapter, prompt_ids, p, stream, deadline, rng))
        return request

    def close(self) -> None:
        """Stop the loop; every request still waiting or in flight gets a 503."""
        self.closed = True
        self.pending.put(None)

    # --- the scheduling loop ---------------------------------------------------------------------

    def _loop(self) -> None:
        while not self.closed:
            try:
                joining = self._take_pending()
                with self.lock:
                    if joining:
                        self._prefill(joining)
                    if self.active:
                        self._decode_step()
            except BaseException as exc:  # noqa: BLE001 - every waiting request must hear about it
                for row in self.active:
                    row.request.push(row.index, exc)
                self._reset()
        self._fail_all(_shutting_down())

    def _take_pending(self) -> list[_Row]:
        """Rows that join the batch before the next step: block while idle, then gather a burst for
        ``wait_ms``. A row joins while the batch stays within ``max_batch`` rows and ``max_batch_tokens``
        cache cells (rows x columns); one that does not fit waits at the head of the line."""
        rows: list[_Row] = []
        idle = not self.active and not self.backlog
        deadline = time.monotonic() + (self.wait_s if idle else 0.0)
        while True:
            try:
                row = self._next_row(block=idle and not rows, deadline=deadline if idle else None)
            except queue.Empty:
                break
            if row is None:  # closing
                break
            if row.request.cancelled.is_set():
                continue
            if not self._fits(rows, row):
                self.backlog.appendleft(row)
                break
            rows.append(row)
        return rows

    def _next_row(self, block: bool, deadline: float | None) -> _Row | None:
        """The backlog's head, else the queue's: waiting forever, until ``deadline``, or not at all."""
        if self.backlog:
            return self.backlog.popleft()
        if block:
            return self.pending.get()
        if deadline is not None:
            return self.pending.get(timeout=max(0.0, deadline - time.monotonic()))
        return self.pending.get_nowait()

    def _fits(self, joining: list[_Row], row: _Row) -> bool:
        """Would the batch, with ``row``, stay within max_batch rows and, up to the last token any row
        may still generate, within max_batch_tokens cache cells?"""
        if not self.active and not joining:
            return True  # a lone request always runs
        rows = [*self.active, *joining, row]
        width = max(self.mask.shape[1] if self.mask is not None else 0, *(len(r.prompt_ids) for r in rows))
        remaining = max(r.params.max_tokens - len(r.generated) for r in rows)
        return len(rows) <= self.max_batch and len(rows) * (width + remaining) <= self.max_batch_tokens

    def _forward(self, input_ids, mask, positions, adapters: list[str], cache):
        import torch

        kw = {"adapter_names": adapters} if self.adapters else {}
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True, logits_to_keep=1, **kw)
        return out.logits[:, -1, :].float(), out.past_key_values

    def _prefill(self, rows: list[_Row]) -> None:
        """Run the joining prompts together (left-padded), take each row's first token, merge the survivors."""
        import torch
        from transformers import DynamicCache

        device = self.model.device
        width = max(len(r.prompt_ids) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, positions, [r.adapter for r in rows], DynamicCache())
        keep = self._advance(rows, logits)
        if keep:
            self._merge([rows[i] for i in keep], cache, mask, keep)

    def _decode_step(self) -> None:
        import torch

        device = self.model.device
        ids = torch.tensor([[r.generated[-1]] for r in self.active], device=device)
        self.mask = torch.cat([self.mask, torch.ones((len(self.active), 1), dtype=self.mask.dtype, device=device)], 1)
        positions = torch.tensor([[r.position] for r in self.active], device=device)
        logits, self.cache = self._forward(ids, self.mask, positions, [r.adapter for r in self.active], self.cache)
        keep = self._advance(self.active, logits)
        if len(keep) < len(self.active):
            self._select(keep)

    def _advance(self, rows: list[_Row], logits) -> list[int]:
        """Append each row's next token; finished rows are answered, abandoned ones dropped; returns the rest."""
        tokens = self._sample(rows, logits)
        now = time.monotonic()
        keep = []
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            if row.request.cancelled.is_set():
                continue
            finish = "stop" if token in self.eos_ids else None
            if finish is None:
                row.generated.append(token)
                finish = self._limit_reached(row, now)
            if finish is None:
                if row.stream:
                    self._stream_delta(row)
                keep.append(i)
            else:
                self._answer(row, finish)
        return keep

    def _limit_reached(self, row: _Row, now: float) -> str | None:
        """'stop' at a stop string; 'length' at max_tokens, the end of the context or the request's deadline."""
        if row.params.stop and any(s in self._text(row.generated) for s in row.params.stop):
            return "stop"
        full = len(row.prompt_ids) + len(row.generated) >= self.context_length
        if len(row.generated) >= row.params.max_tokens or full or now > row.deadline:
            return "length"
        return None

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _answer(self, row: _Row, finish: str) -> None:
        """The final text (cut at a stop string), its remaining delta when streamed, then the Generation."""
        text = cut_at_stop(self._text(row.generated), row.params.stop)
        if row.stream and text.startswith(row.sent) and len(text) > len(row.sent):
            row.request.push(row.index, text[len(row.sent):])
        row.request.push(row.index, Generation(text, len(row.prompt_ids), len(row.generated), finish))

    def _stream_delta(self, row: _Row) -> None:
        """Send the text that is final: a trailing partial UTF-8 character or a possible stop prefix waits."""
        text = self._text(row.generated)
        if text.endswith("\ufffd") or not text.startswith(row.sent):
            return
        held = max((len(s) - 1 for s in row.params.stop), default=0)
        ready = text[: len(text) - held] if held else text
        if len(ready) > len(row.sent):
            row.request.push(row.index, ready[len(row.sent):])
            row.sent = ready

    def _sample(self, rows: list[_Row], logits) -> list[int]:
        import torch

        tokens = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            p = row.params
            if p.greedy:
                continue
            probs = torch.softmax(logits[i] / p.temperature, -1)
            if p.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                drop = sorted_p.cumsum(-1) - sorted_p > p.top_p  # keep the smallest prefix reaching top_p
                sorted_p[drop] = 0
                probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
            tokens[i] = int(torch.multinomial(probs, 1, generator=row.rng))
        return tokens

    # --- the batch's KV cache ---------------------------------------------------------------------

    def _merge(self, rows: list[_Row], cache, mask, keep: list[int]) -> None:
        """Append prefilled rows to the running batch, left-padding the shorter side's cache columns."""
        import torch

        index = torch.tensor(keep, device=mask.device)
        mask = mask.index_select(0, index)
        layers = [(layer.keys.index_select(0, index), layer.values.index_select(0, index)) for layer in cache.layers]
        if self.cache is None:
            for layer, (k, v) in zip(cache.layers, layers, strict=True):
                layer.keys, layer.values = k, v
            self.cache, self.mask, self.active = cache, mask, list(rows)
            return
        width = max(self.mask.shape[1], mask.shape[1])
        self.mask = torch.cat([_left_pad(self.mask, width, -1), _left_pad(mask, width, -1)], 0)
        for layer, (k, v) in zip(self.cache.layers, layers, strict=True):
            layer.keys = torch.cat([_left_pad(layer.keys, width, -2), _left_pad(k, width, -2)], 0)
            layer.values = torch.cat([_left_pad(layer.values, width, -2), _left_pad(v, width, -2)], 0)
        self.active += rows

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

    def _fail_all(self, exc: Exception) -> None:
        for row in [*self.active, *self.backlog]:
            row.request.push(row.index, exc)
        self._reset()
        self.backlog.clear()
        while True:
            try:
                row = self.pending.get_nowait()
            except queue.Empty:
                return
            if row is not None:
                row.request.push(row.index, exc)


def _left_pad(t, width: int, dim: int):
    """Zeros before ``t`` along ``dim`` up to ``width``."""
    import torch

    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim)


def _shutting_down() -> APIError:
    return APIError(503, "The server is shutting down; retry on another instance.", type_="server_error",
                    code="server_shutting_down")
