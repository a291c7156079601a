"""The builtin inference engine: the base model in this process, adapters through PEFT, continuous batching.

It drives the project's one continuous-batching engine (:class:`tunesmith.generation.ContinuousBatch`) from a
background thread: it gathers rows arriving together (a burst of ``wait_ms`` when idle), runs one step at a time
for every row in flight, answers rows as they finish, streams text deltas, and drops rows whose client went away
(``Request.cancel``) before the next step. Before every step it gives each tenant (API key) its share of the step
(:mod:`tunesmith.serve.engines.shares`): rows past a tenant's share are paused with their KV cache kept and resumed
when the share grows, rows beyond it wait in the tenant's line. The interface it implements is
:mod:`tunesmith.serve.engines.interface`.
"""

from __future__ import annotations

import asyncio
import hashlib
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.generation import BASE, ContinuousBatch, GenParams, Row, cut_at_stop
from tunesmith.serve.engines.beside import Beside, Work, shutting_down
from tunesmith.serve.engines.interface import Delta, Generation, InferenceEngine, Request, TokenIds
from tunesmith.serve.engines.shares import (
    Anticipation,
    Demand,
    ShareRules,
    Shares,
    default_anticipate_s,
    default_contended_rows,
)
from tunesmith.serve.errors import APIError
from tunesmith.serve.lanes import all_cores, torch_threads

__all__ = ["Engine"]


def peft_name(model_id: str) -> str:
    """The name PEFT holds a served fine-tune under. PEFT names modules after adapters and refuses a ".", which a
    model id may hold (a fine-tune of Qwen2.5-0.5B, a job suffix), so: a digest of the id, of one fixed form."""
    return "ft_" + hashlib.sha256(model_id.encode("utf-8", "surrogatepass")).hexdigest()[:24]


@dataclass(eq=False, kw_only=True)
class _ServedRow(Row):
    """One choice of one API request in flight."""

    request: Request
    index: int
    stream: bool = False
    sent: str = ""  # text already streamed
    sent_tokens: int = 0  # token logprobs already streamed
    tenant: str | None = None  # the caller whose share of the batch this row counts against
    background: bool = False  # a batch's line: after every interactive row, in its tenant's share
    token_ids: bool = False  # answer with the generation's token ids too (Generation.ids)
    arrived: float = 0.0  # time.monotonic() when it was submitted

    @property
    def abandoned(self) -> bool:
        return self.request.cancelled.is_set()


class Engine(Beside, InferenceEngine):
    """The built-in engine: the base model in this process, adapters through PEFT, continuous batching."""

    def __init__(self, base: str, adapters: dict[str, str | Path] | None = None, max_batch: int = 16,
                 wait_ms: float = 15.0, precision: str = "auto", request_timeout_s: float = 300.0,
                 max_batch_tokens: int = 65_536, contended_rows: int | None = None):
        from tunesmith.generation import stop_ids
        from tunesmith.generation.constrained import ConstraintCache
        from tunesmith.machine.placement import pick_placement
        from tunesmith.models.few_rows import weight_first_for_few_rows
        from tunesmith.models.loading import load_model, sharing_weights

        super().__init__(base)
        self.placement = pick_placement(precision)
        self.model = load_model(base, self.placement)
        weight_first_for_few_rows(self.model)  # a step of a few rows near the cost of one on a CPU
        # the plain base's tree on the same weights, taken before peft wraps the served one: the Tinker trainer's base
        self._resident = sharing_weights(self.model)
        # rows of different callers: one row's failure (its seed, its matcher) ends that row only
        self.batch = ContinuousBatch(self.model, self.tokenizer, max_batch, max_batch_tokens, isolate_rows=True)
        self.context_length = self.batch.context_length
        self.wait_s, self.request_timeout_s = wait_ms / 1000, request_timeout_s
        self.lock = threading.Lock()
        self.pending: queue.Queue[_ServedRow | None] = queue.Queue()
        self.line = TenantLines()  # arrived rows by tenant, not yet in the batch
        device = self.model.device
        self.shares = Shares(ShareRules(max_batch, contended_rows or default_contended_rows(device)))
        self.anticipation = Anticipation(default_anticipate_s(device))
        self.closed = False
        self.works: deque[Work] = deque()  # handed to the engine's thread (run_beside), not run yet
        self.stepped_at = self.step_s = 0.0  # during work: when step_between last stepped, and how long it took
        self.cores = self.threads = 0  # the loop thread's cores, and its steps' torch threads now
        self.steps_by_threads: Counter = Counter()  # steps run, by their torch threads
        # compiled output constraints; the tokenizer converted for llguidance now, beside the start, so that the first
        # request with a schema does not stall every tenant's decoding while it converts
        self.constraints = ConstraintCache(self.tokenizer, self.model.config.vocab_size, stop_ids(self.tokenizer, self.model),
                                           fail_rows=True)
        self.constraints.prepare(background=True)
        for name, path in (adapters or {}).items():
            self.add_adapter(name, path)
        self.worker = threading.Thread(target=self._loop, name="tunesmith-engine", daemon=True)
        self.worker.start()

    def resident_base(self):
        return self._resident, self.placement

    def _step_threads(self) -> int:
        """The next step's torch threads, set on this thread when they change. A step holding a light tenant's rows
        (a chat request) takes every core: interactive decoding comes first. A step of only heavy tenants' rows leaves
        one core to the rest of the server while a light tenant is between two requests: the event loop that admits
        its next request then finds a core free, not one shared with the step's threads (beside a 64-row sample, a
        quiet key's 0.13 s Tinker sample took 2.4x when the step kept both cores; docs/benchmarks.md)."""
        every, shares = self.cores, self.shares
        spare = not shares.light_running and shares.light_waiting
        want = every - 1 if spare and every > 1 else every
        if want != self.threads:
            torch_threads(want)
            self.threads = want
        return want

    @property
    def active(self) -> list[Row]:
        """The rows in flight."""
        return self.batch.active

    # --- adapters -------------------------------------------------------------------------

    def _unload_adapter(self, name: str) -> None:
        with self.lock:
            if len(self.adapters) == 1:  # PEFT cannot hold zero adapters: go back to the bare base model
                self.model = self.model.unload()
            else:
                self.model.delete_adapter(peft_name(name))
            self.batch.model = self.model

    def _load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        with self.lock:
            if not self.adapters:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=peft_name(name))
            else:
                self.model.load_adapter(path, adapter_name=peft_name(name))
            self.model.eval()
            self.batch.model = self.model

    def json_constraint(self, spec: dict | str):
        """A logits-processor factory (llguidance) that keeps every choice inside ``spec``: a JSON schema (its
        ``x-guidance`` options: the JSON's separators) or a Lark grammar. Compiled once per spec and kept; the
        first call converts the tokenizer (seconds), so the routes call this off the event loop."""
        return self.constraints.get(spec)

    # --- requests -------------------------------------------------------------------------

    def submit(self, model_id: str, prompt_ids: list[int], params: list[GenParams], stream: bool = False,
               constraint=None, logprobs: int | None = None, tenant: str | None = None,
               background: bool = False, prompt_logprobs: int | None = None, token_ids: bool = False) -> Request:
        """``constraint(rows, prompt_len)``: a logits processor factory (a JSON schema) every choice decodes
        under; ``logprobs``: each generated token's logprob and that many top alternatives, reported;
        ``prompt_logprobs``: the same for every prompt token, from the row's prefill;
        ``background``: a batch's line, decoded in its tenant's share after interactive rows;
        ``token_ids``: each Generation's ``ids`` too."""
        if self.closed:
            raise shutting_down()
        request = Request(len(params), asyncio.get_running_loop())
        model_id = self.served_name(model_id)
        adapter = BASE if model_id == self.base_name else peft_name(model_id)
        arrived = time.monotonic()
        deadline = arrived + self.request_timeout_s
        for i, p in enumerate(params):
            processors = (constraint(1, len(prompt_ids)),) if constraint is not None else ()
            self.pending.put(_ServedRow(prompt_ids, p, adapter, processors, deadline=deadline, logprobs=logprobs,
                                        prompt_logprobs=prompt_logprobs, request=request, index=i, stream=stream,
                                        tenant=tenant, background=background, token_ids=token_ids,
                                        arrived=arrived))
        return request

    def close(self) -> None:
        """Stop the loop; every request still waiting or in flight gets a 503."""
        self.closed = True
        self.pending.put(None)

    # --- the scheduling loop ---------------------------------------------------------------------

    def _loop(self) -> None:
        # every core for this thread's steps; the server's other torch threads run on one each (lanes.torch_threads)
        self.cores = self.threads = all_cores()
        while not self.closed:
            try:
                self._take_pending()
                self._run_works()
                if self.batch.busy:
                    self._step_once()
            except BaseException as exc:  # noqa: BLE001 - every request in flight must hear about it
                for row in self.batch.abort():
                    row.request.push(row.index, exc)
        self._fail_all(shutting_down())

    def _step_once(self) -> None:
        """One step of the batch: its rows' next tokens, the rows that ended answered, the streams' deltas sent."""
        self.steps_by_threads[self._step_threads()] += 1
        with self.lock:
            finished = self.batch.step()
        for row in finished:
            self._answer(row)
        self._note_ends(finished)
        for row in self.batch.active:
            if row.stream:
                self._stream_delta(row)

    def _take_pending(self, block: bool = True) -> None:
        """Move arriving rows to their tenants' lines (block while idle, then gather a burst for ``wait_ms``;
        while rows are in flight, take only what has already arrived; ``block`` False: never wait), then give each
        tenant its share of the next step (:meth:`_share_out`). Work handed over (:meth:`run_beside`) is kept for
        :meth:`_run_works`, and ends the wait."""
        idle = block and not self.batch.busy and not self.line
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                if not block:
                    row = self.pending.get_nowait()
                elif idle and not self.batch.waiting and not self.line:
                    row = self.pending.get()
                elif idle:
                    row = self.pending.get(timeout=max(0.0, deadline - time.monotonic()))
                else:  # rows in flight: wait only for a quick tenant's next request (Anticipation)
                    wait = self.anticipation.wait_s(time.monotonic())
                    row = self.pending.get(timeout=wait) if wait > 0 else self.pending.get_nowait()
            except queue.Empty:
                break
            if row is None:  # closing
                break
            if isinstance(row, Work):
                self.works.append(row)
                if block:
                    break
                continue
            self.anticipation.arrived(row.tenant, row.arrived)  # when submitted, not when a step let it in
            self.line.add(row)
        self._share_out()

    def _note_ends(self, finished: list[_ServedRow]) -> None:
        """The tenants whose last row just ended (none left in the batch or in line), for :class:`Anticipation`."""
        if not finished:
            return
        batch, now = self.batch, time.monotonic()
        left = {r.tenant for rows in (batch.active, batch.waiting, batch.paused_rows) for r in rows}
        for tenant in {r.tenant for r in finished} - left:
            if not self.line.lines.get(tenant):
                self.anticipation.ended_all(tenant, now)

    def _share_out(self) -> None:
        """Each tenant's rows for the next step, as its share allows (:mod:`tunesmith.serve.engines.shares`): its
        rows in the batch first (the oldest kept), then its paused rows, then its line, interactive before
        background; rows past the share are paused (in the batch) or put back in line (not started yet)."""
        batch = self.batch
        batch.drop_paused(lambda r: not r.abandoned)  # their callers left: nobody to answer
        rows = tenant_rows(batch.active, batch.waiting, batch.paused_rows, self.line)
        quotas = self.shares.quotas({t: Demand(len(r.interactive), len(r.background)) for t, r in rows.items()})
        pause, resume, start, back = [], [], [], []
        for tenant, mine in rows.items():
            allowed = quotas[tenant]
            for kind, n in (("interactive", allowed.interactive), ("background", allowed.background)):
                ordered = getattr(mine, kind)
                for k, (where, row) in enumerate(ordered):
                    chosen = k < n
                    if where == "active" and not chosen:
                        pause.append(row)
                    elif where == "waiting" and not chosen:
                        back.append(row)
                    elif where == "paused" and chosen:
                        resume.append(row)
                    elif where == "line" and chosen:
                        start.append(row)
        if pause:
            batch.pause(pause)
        if back:
            gone = {id(r) for r in back}
            batch.waiting = deque(r for r in batch.waiting if id(r) not in gone)
            self.line.put_back(back)
        if resume:
            batch.resume(resume)
        for row in start:
            self.line.remove(row)
            batch.add(row)

    def _answer(self, row: _ServedRow) -> None:
        """The final text (cut at a stop string), its remaining delta when streamed, then the Generation; a row
        that failed alone gets its error instead."""
        if row.error is not None:
            row.request.push(row.index, row_failure(row.error))
            return
        text = cut_at_stop(self.batch.text(row), row.params.stop)
        rest = self._unsent(row) if row.stream else None
        if row.stream and text.startswith(row.sent) and (len(text) > len(row.sent) or rest):
            row.request.push(row.index, Delta(text[len(row.sent):], rest))
        asked = row.logprobs is not None
        row.request.push(row.index, Generation(
            text, len(row.prompt_ids), len(row.generated), row.finish_reason,
            self._entries(row.token_logprobs) if asked else None,
            self._entries([row.end_logprob])[0] if asked and row.end_logprob else None,
            self._prompt_entries(row) if row.prompt_logprobs is not None else None,
            token_ids(row) if row.token_ids else None))

    def _unsent(self, row: _ServedRow) -> list[dict] | None:
        """The logprobs entries of the tokens generated since the last streamed delta (None: not asked)."""
        if row.logprobs is None:
            return None
        entries = self._entries(row.token_logprobs[row.sent_tokens:])
        row.sent_tokens = len(row.token_logprobs)
        return entries

    def _entries(self, logprobs) -> list[dict]:
        """Token logprobs as OpenAI's ``logprobs.content`` entries (token text, logprob, bytes, top_logprobs)."""
        def entry(token: int, logprob: float) -> dict:
            text = self.tokenizer.decode([token])
            return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode())}

        return [entry(t.token, t.logprob) | {"top_logprobs": [entry(i, v) for i, v in t.top]} for t in logprobs]

    def _prompt_entries(self, row: _ServedRow) -> list[dict]:
        """A scored prompt's entries: its first token's without a logprob (nothing comes before it), then each
        token's as a generated token's."""
        first = self.tokenizer.decode(row.prompt_ids[:1])
        return [{"token": first, "logprob": None, "bytes": list(first.encode()), "top_logprobs": None},
                *self._entries(row.prompt_token_logprobs)]

    def _stream_delta(self, row: _ServedRow) -> None:
        """Send the text that is final: a trailing partial UTF-8 character or a possible stop prefix waits."""
        text = self.batch.text(row)
        if text.endswith("\ufffd") or not text.startswith(row.sent):
            return
        held = max((len(s) - 1 for s in row.params.stop), default=0)
        ready = text[: len(text) - held] if held else text
        if len(ready) > len(row.sent):
            row.request.push(row.index, Delta(ready[len(row.sent):], self._unsent(row)))
            row.sent = ready

    def _fail_all(self, exc: Exception) -> None:
        for row in [*self.batch.abort(), *self.batch.waiting, *self.line.take_all()]:
            row.request.push(row.index, exc)
        self.batch.waiting.clear()
        while True:
            try:
                row = self.pending.get_nowait()
            except queue.Empty:
                return
            if isinstance(row, Work):
                row.done.set_exception(exc)
            elif row is not None:
                row.request.push(row.index, exc)
        while self.works:
            self.works.popleft().done.set_exception(exc)


class TenantLines:
    """Rows waiting to enter the batch, one line per tenant, in arrival order (rows whose caller left are dropped
    when they are looked at)."""

    def __init__(self):
        self.lines: dict[object, deque] = {}

    def __bool__(self) -> bool:
        return any(self.lines.values())

    def add(self, row: _ServedRow) -> None:
        self.lines.setdefault(row.tenant, deque()).append(row)

    def put_back(self, rows: list[_ServedRow]) -> None:
        """Rows taken out of the batch before they started: first in their tenants' lines again."""
        for row in reversed(rows):
            self.lines.setdefault(row.tenant, deque()).appendleft(row)

    def remove(self, row: _ServedRow) -> None:
        line = self.lines[row.tenant]
        line.remove(row)
        if not line:
            del self.lines[row.tenant]

    def rows(self):
        """Every waiting row whose caller still waits, dropping the others."""
        for tenant in list(self.lines):
            line = self.lines[tenant]
            kept = deque(r for r in line if not r.abandoned)
            if kept:
                self.lines[tenant] = kept
                yield from kept
            else:
                del self.lines[tenant]

    def take_all(self) -> list[_ServedRow]:
        out = [r for line in self.lines.values() for r in line]
        self.lines.clear()
        return out


@dataclass
class _TenantRows:
    """One tenant's rows, each with where it is (active, waiting, paused, line), in the order they keep a place."""

    interactive: list = field(default_factory=list)
    background: list = field(default_factory=list)


def tenant_rows(active, waiting, paused, line: TenantLines) -> dict[object, _TenantRows]:
    """Every tenant's rows in the order they keep their place in its share: in the batch (oldest first), about to
    join it, paused, then waiting in line."""
    out: dict[object, _TenantRows] = {}
    for where, rows in (("active", active), ("waiting", [r for r in waiting if not r.abandoned]),
                        ("paused", paused), ("line", list(line.rows()))):
        for row in rows:
            mine = out.setdefault(row.tenant, _TenantRows())
            (mine.background if row.background else mine.interactive).append((where, row))
    return out


def token_ids(row: _ServedRow) -> TokenIds:
    """The row's generation as token ids: its tokens (the stop token that ended it last), their logprobs and its
    prompt's, as asked."""
    ended = [row.stop_token] if row.stop_token is not None else []
    logprobs = None
    if row.logprobs is not None:
        logprobs = [t.logprob for t in row.token_logprobs] + ([row.end_logprob.logprob] if ended else [])
    return TokenIds(row.generated + ended, logprobs,
                    list(row.prompt_token_logprobs) if row.prompt_logprobs is not None else None)


def row_failure(exc: BaseException) -> APIError:
    """What the caller of a row that failed alone hears: a matcher that could not go on is the schema's 400 (its
    grammar is past what the decoder can follow), anything else a 500 for this row only."""
    from tunesmith.generation.constrained import ConstraintBroken

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ConstraintBroken):
        return APIError(400, f"{exc}. Simplify the schema.", code="constraint_failed")
    return APIError(500, f"This request's generation failed: {type(exc).__name__}: {str(exc)[:500]}",
                    type_="server_error", code="generation_failed")
