"""The vLLM engine: tunesmith's API in front, a supervised vLLM OpenAI server behind.

Prompts are rendered and tokenized here with the base model's tokenizer, exactly as for the built-in engine
(chat template, tools, forced-call prefix), and sent to vLLM's ``/v1/completions`` as token ids, so both
engines see the same prompt and greedy answers agree. Each choice is one vLLM request (``n`` choices with
seeds ``seed + i``, as the built-in engine draws them); ``stop``, ``temperature``, ``top_p``, ``top_k``, the tokens
that end a row, penalties, ``logit_bias`` and logprobs pass through, streamed text arrives as vLLM streams it (with its
tokens' logprobs), and a generation comes as token ids too when asked (``token_ids``, :mod:`.wire`). A
forced tool call, ``response_format`` and ``text.format`` decode under vLLM's structured outputs, with the
built-in engine's library and grammars (:func:`engine_args`).

Tenants (API keys) share vLLM's batch as they share the built-in engine's steps (:mod:`tunesmith.serve.engines.shares`):
vLLM is sent at most each tenant's share of rows (and of prompt tokens waiting for their prefill), the rest wait in
the tenant's line here, and a flood's rows past a share that shrank are paused by recompute
(:mod:`tunesmith.serve.engines.vllm.sharing`). Every row is streamed from vLLM with its token ids, whether or not its
caller streams. The shares are decided again whenever a row arrives, gets its first token or ends, and every
``PRESENCE_TICK_S`` while a tenant is present between requests.

vLLM is reached over its private Unix socket with its private key (:mod:`tunesmith.serve.engines.vllm.server`), through
one pooled HTTP client per event loop. Adapters are loaded into vLLM at run time by a background thread
(:mod:`tunesmith.serve.engines.vllm.adapters`) under their model id and unloaded when deleted; the routes check
ownership before a model id is sent here. Every request has a deadline (``request_timeout_s``) and ends with an
answer or an OpenAI error, whatever fails: vLLM's errors keep vLLM's status and message, a vLLM that dies is
restarted and requests meanwhile get a 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tunesmith.serve.engines.interface import Delta, Generation, GenParams, InferenceEngine, Request
from tunesmith.serve.engines.shares import ShareRules, Shares, default_contended_rows
from tunesmith.serve.engines.vllm.sharing import (
    DONE,
    LINE,
    PAUSED,
    RUNNING,
    Row,
    ends_mid_character,
    may_pause,
    plan,
    within_prefill,
)
from tunesmith.serve.engines.vllm.wire import (
    IdsAsked,
    answer,
    chat_logprobs,
    completion_body,
    engine_failed,
    error_message,
    shutting_down,
    timed_out,
    unavailable,
    vllm_error,
)
from tunesmith.serve.errors import APIError

log = logging.getLogger("tunesmith.serve")
ADAPTER_TIMEOUT_S = 120.0
DEATH_GRACE_S = 2.0  # after a broken connection: how long to look for vLLM's exit
VLLM_BASE_URL = "http://vllm"  # the host part is a placeholder: every call goes over the Unix socket
VLLM_BATCH_ROWS = 256  # the rows tunesmith lets vLLM hold (ServeSettings.engine_batch)
PRESENCE_TICK_S = 0.1  # how often shares are decided again while a tenant is present between requests
CPU_PREFILL_TOKENS = 256  # a tenant's prompt tokens waiting for their first token on a CPU (same measurement)


class VllmEngine(InferenceEngine):
    adapts_output_layer = False  # vLLM serves LoRA on the linear layers but the output one (lm_head)

    def __init__(self, base: str, adapters: dict[str, str | Path] | None, log_dir: Path, python: str | None = None,
                 request_timeout_s: float = 300.0, extra_args: tuple[str, ...] = (), start_timeout_s: float | None = None,
                 gpu_memory_utilization: float | None = None, max_rows: int = VLLM_BATCH_ROWS,
                 contended_rows: int | None = None, prefill_tokens: int | None = None):
        from tunesmith.models.names import resolve
        from tunesmith.serve.engines.vllm.adapters import AdapterLoader, lora_targets
        from tunesmith.serve.engines.vllm.server import START_TIMEOUT_S, VllmServer, vllm_launch, vllm_python

        super().__init__(base)
        targets = lora_targets(resolve(base))
        # the user's --vllm-arg come last and win
        launch = vllm_launch(base, (*engine_args(), "--lora-target-modules", *targets, *extra_args),
                             gpu_memory_utilization)
        self.request_timeout_s = request_timeout_s
        self.server = VllmServer(vllm_python(python), launch, log_dir, on_restart=self._restarted,
                                 start_timeout_s=start_timeout_s or START_TIMEOUT_S)
        self.loader = AdapterLoader(self._post_adapter, self.server.ready, targets)
        self.server.start()
        self.context_length = self.server.max_model_len or self.tokenizer.model_max_length
        self.tasks: set[asyncio.Task] = set()  # every vLLM call in flight
        # compiled constraints (llguidance, this tokenizer): validation and answer checks; the tokenizer converted now,
        # beside the start, not in the first request with a schema (it holds the GIL the event loop needs)
        self._cache = self._new_constraints()
        self._cache.prepare(background=True)
        self.in_flight_of: Counter = Counter()  # tenant -> its vLLM calls not yet ended (their priority)
        self.shares = Shares(ShareRules(max_rows, contended_rows or vllm_contended_rows()))
        self.prefill_tokens = prefill_tokens or vllm_prefill_tokens()
        self.prefilling: Counter = Counter()  # tenant -> prompt tokens sent whose first token has not come back
        self.rows: list[Row] = []  # every row not yet ended: in its tenant's line, in vLLM or paused
        self.rows_lock = threading.Lock()
        self.pauses = 0  # rows paused by recompute so far
        self._ticking: set[int] = set()  # event loops with a presence tick armed
        self._clients: dict[int, tuple[int, object]] = {}  # event loop id -> (vLLM start, httpx.AsyncClient)
        for name, path in (adapters or {}).items():
            self.add_adapter(name, path)

    # --- adapters -------------------------------------------------------------------------

    def _load_adapter(self, name: str, path: str) -> None:
        self.loader.add(name, path)  # loaded by the loader's thread; requests for it wait for the load

    def _unload_adapter(self, name: str) -> None:
        self.loader.remove(name)

    def _restarted(self) -> None:
        """Called by the server's watcher after a restart, before it is marked ready."""
        self.context_length = self.server.max_model_len or self.context_length
        self.loader.reload()

    def _post_adapter(self, action: str, body: dict) -> None:
        import httpx2 as httpx

        from tunesmith.serve.engines.vllm.adapters import Refused, Unreachable

        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=self.server.socket_path), timeout=ADAPTER_TIMEOUT_S) as c:
                r = c.post(f"{VLLM_BASE_URL}/v1/{action}_lora_adapter", json=body, headers=self.server.headers)
        except httpx.HTTPError as exc:
            raise Unreachable(f"{type(exc).__name__}: {exc}") from None
        if r.status_code != 200 and "already" not in r.text:  # loading twice (a restart race) is no error
            raise Refused(error_message(r.text))

    def json_constraint(self, spec: dict | str) -> VllmConstraint:
        """vLLM's structured outputs for ``spec``, as the built-in engine reads it: vLLM decodes with llguidance
        too (:func:`engine_args`), so a schema keeps its ``x-guidance`` separators and a Lark grammar is one. The
        spec is compiled here first with the same compiler and this tokenizer (a ConfigError when it cannot
        constrain, before vLLM sees it), and the compiled form checks each finished answer (:meth:`_conforming`).
        Called off the event loop."""
        compiled = self._cache.get(spec)
        return VllmConstraint({"grammar": spec} if isinstance(spec, str) else {"json": spec}, compiled)

    def _new_constraints(self):
        from tunesmith.generation.constrained import ConstraintCache

        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        return ConstraintCache(self.tokenizer, len(self.tokenizer), eos, fail_rows=True)

    def _conforming(self, gen: Generation, constraint, params: GenParams) -> Generation:
        """A finished answer under a constraint, checked: vLLM ends a row whose matcher failed with its end of
        sequence, so an answer that says "stop" and does not conform is this row's error, never its text. An
        answer cut by ``max_tokens`` (``length``) or a stop string is not whole and is not checked."""
        if constraint is None or gen.finish_reason != "stop" or params.stop:
            return gen
        why = constraint.compiled.conforms(self.tokenizer(gen.text, add_special_tokens=False)["input_ids"])
        if why is None:
            return gen
        raise APIError(400, f"The answer could not go on under its schema: {why}. Simplify the schema.",
                       code="constraint_failed")

    # --- requests -------------------------------------------------------------------------

    def submit(self, model_id: str, prompt_ids: list[int], params: list[GenParams], stream: bool = False,
               constraint=None, logprobs: int | None = None, tenant: str | None = None,
               background: bool = False, prompt_logprobs: int | None = None, token_ids: bool = False) -> Request:
        """Each choice one vLLM request, sent when its tenant's share has room (:meth:`_share_out`); its
        ``priority`` the number of this tenant's rows already in vLLM (vLLM's priority scheduling serves lower
        numbers first). A row that scores its prompt is never paused (its continuation would score another one).
        ``token_ids``: each Generation's ``ids`` too, from the token ids every row is streamed with."""
        if not self.server.ready.is_set():
            raise unavailable()
        loop = asyncio.get_running_loop()
        request = Request(len(params), loop)
        name, deadline = self.served_name(model_id), loop.time() + self.request_timeout_s
        ids = IdsAsked(logprobs is not None, prompt_logprobs) if token_ids else None
        rows = []
        for i, p in enumerate(params):
            pausable = may_pause(p, constraint is not None) and prompt_logprobs is None
            body = completion_body(name, prompt_ids, p, constraint.body if constraint else None, logprobs,
                                   prompt_logprobs, ids)
            rows.append(Row(request=request, index=i, body=body, model_id=model_id, params=p, constraint=constraint,
                            tenant=tenant, background=background, stream=stream, pausable=pausable,
                            deadline=deadline, ids=ids))
        with self.rows_lock:
            self.rows.extend(rows)
        request.on_cancel.append(lambda: self._cancel(rows))
        loop.call_at(deadline, self._expire, rows)
        self._share_out()
        return request

    # --- the fair share -----------------------------------------------------------------------

    def _share_out(self) -> None:
        """Send, pause and resume rows so that each tenant holds its share of vLLM's batch
        (:func:`tunesmith.serve.engines.vllm.sharing.plan`) and is sent no more prompt tokens than its prefill
        budget allows (:func:`tunesmith.serve.engines.vllm.sharing.within_prefill`)."""
        with self.rows_lock:
            self.rows = [r for r in self.rows if r.state != DONE]
            start, pause = plan(self.rows, self.shares)
            start = within_prefill(start, self.prefilling, self.prefill_tokens)
            for row in start:
                row.state = RUNNING
        for row in pause:
            self._pause(row)
        for row in start:
            if not on_loop(row.loop, self._start, row):
                row.state = DONE  # its event loop is gone: nobody waits for it
        if set(self.shares.last_seen) - {r.tenant for r in self.rows}:  # a tenant present between requests
            self._tick()

    def _tick(self) -> None:
        """Decide the shares again shortly: a tenant's presence ends without a row ending."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on an event loop: the next row to arrive or end decides
            return
        if id(loop) not in self._ticking:
            self._ticking.add(id(loop))
            loop.call_later(PRESENCE_TICK_S, self._ticked, loop)

    def _ticked(self, loop) -> None:
        self._ticking.discard(id(loop))
        self._share_out()

    def _start(self, row: Row) -> None:
        """Send one row to vLLM (on its request's event loop)."""
        if row.request.cancelled.is_set() or row.pause_asked:
            row.state = DONE if row.request.cancelled.is_set() else PAUSED
            row.pause_asked = False
            return
        body = row.continuation()
        body["priority"] = self.in_flight_of[row.tenant]
        self.in_flight_of[row.tenant] += 1
        row.prefill = len(body["prompt"])
        self.prefilling[row.tenant] += row.prefill
        row.task = task = asyncio.ensure_future(self._generate(row, body))
        self.tasks.add(task)
        task.add_done_callback(lambda done: self._ended(done, row))

    def _pause(self, row: Row) -> None:
        """Close a row's vLLM request now (a row to restart, or one whose text ends on a character), else at the next
        chunk that ends on one (a row about to be sent is not sent)."""
        row.pause_asked = True
        if row.stopping or row.task is None or (row.pausable and ends_mid_character(self.tokenizer, row.generated)):
            return
        row.stopping = True
        on_loop(row.loop, row.task.cancel)

    def _ended(self, task: asyncio.Task, row: Row) -> None:
        self.tasks.discard(task)
        self.in_flight_of[row.tenant] -= 1
        if not self.in_flight_of[row.tenant]:
            del self.in_flight_of[row.tenant]
        self._prefilled(row)
        with self.rows_lock:
            row.task, row.stopping, row.pause_asked = None, False, False
            if row.state != PAUSED or row.request.cancelled.is_set():
                row.state = DONE
                self.shares.last_seen[row.tenant] = self.shares.clock()  # present from its last row's end
        self._share_out()

    def _prefilled(self, row: Row) -> None:
        """A row's first token came back (or it ended): its prompt leaves its tenant's prefill budget."""
        if row.prefill:
            self.prefilling[row.tenant] -= row.prefill
            row.prefill = 0
            if not self.prefilling[row.tenant]:
                del self.prefilling[row.tenant]

    def _cancel(self, rows: list[Row]) -> None:
        """The caller left: rows waiting end at once, rows in vLLM are closed."""
        for row in rows:
            if row.state == RUNNING and row.task is not None:
                on_loop(row.loop, row.task.cancel)
            elif row.state in (LINE, PAUSED):
                row.state = DONE

    def _expire(self, rows: list[Row]) -> None:
        """The request's time is up: its rows still waiting (in line or paused) end with the timeout error; rows in
        vLLM end by their own deadline."""
        for row in rows:
            with self.rows_lock:
                waiting = row.state in (LINE, PAUSED)
                row.state = DONE if waiting else row.state
            if waiting:
                row.request.push(row.index, timed_out(self.request_timeout_s))
        self._share_out()

    # --- one row in vLLM ------------------------------------------------------------------------

    async def _generate(self, row: Row, body: dict) -> None:
        """One choice (or its continuation), within the request's deadline; whatever happens, the request hears how
        it ended, or the row is paused."""
        import httpx2 as httpx

        request, index = row.request, row.index
        try:
            async with asyncio.timeout_at(row.deadline):
                await self.loader.wait(body["model"], row.model_id)
                gen = await self._read(row, body)
                if gen is None:
                    return self._paused(row)
                request.push(index, self._conforming(gen, row.constraint, row.params))
        except asyncio.CancelledError:
            if not row.stopping or request.cancelled.is_set():
                raise
            if row.finish is None:
                return self._paused(row)
            request.push(index, answer(row))  # its last chunk came before the pause
        except APIError as exc:
            request.push(index, exc)
        except TimeoutError:
            request.push(index, timed_out(self.request_timeout_s))
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            log.warning("vLLM request failed: %s: %s (its log: %s)", type(exc).__name__, exc, self.server.log_path)
            request.push(index, await self._failure(exc))
        except Exception as exc:  # noqa: BLE001 - never leave a request without an end
            log.exception("vLLM request failed")
            request.push(index, engine_failed(exc))

    def _paused(self, row: Row) -> None:
        with self.rows_lock:
            if not row.pausable:
                row.restart()
            row.state = PAUSED
        self.pauses += 1

    async def _read(self, row: Row, body: dict) -> Generation | None:
        """A row streamed from vLLM with its token ids: each text delta pushed when the caller streams, the whole
        answer at the end; None when the row was asked to pause and its text ends on a character."""
        async with self._client().stream("POST", f"{VLLM_BASE_URL}/v1/completions", json=body,
                                         headers=self.server.headers) as r:
            if r.status_code != 200:
                raise vllm_error(r.status_code, (await r.aread()).decode(errors="replace"))
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                doc = json.loads(line[6:])
                if "error" in doc:
                    raise vllm_error(doc["error"].get("code") or 500, json.dumps(doc))
                for choice in doc.get("choices", []):
                    text = row.take(choice, self._token_text)
                    if text is not None and row.stream:
                        row.request.push(row.index, Delta(text, chat_logprobs(row.logprobs[-1])))
                if row.prefill and row.generated:
                    self._prefilled(row)
                    self._share_out()
                if row.pause_asked and row.finish is None and not (
                        row.pausable and ends_mid_character(self.tokenizer, row.generated)):
                    return None
        if row.finish is None:
            raise ValueError("vLLM's stream ended before the answer did")  # a 503 when vLLM died (_failure)
        return answer(row)

    def _token_text(self, token: int) -> str:
        """A token's text in OpenAI's logprobs entries, as the built-in engine names it."""
        return self.tokenizer.decode([token])

    async def _failure(self, exc: Exception) -> APIError:
        """A broken connection is a 503 when vLLM died (its sockets close a moment before its exit shows), else a
        502 naming what failed."""
        for _ in range(int(DEATH_GRACE_S / 0.1)):
            if not self.server.alive():
                return unavailable()
            await asyncio.sleep(0.1)
        return engine_failed(exc)

    def _client(self):
        """This event loop's pooled client for the running vLLM (a new one after a restart: new socket)."""
        import httpx2 as httpx

        loop, start = asyncio.get_running_loop(), self.server.endpoint.start
        held = self._clients.get(id(loop))
        if held is None or held[0] != start:
            if held is not None:
                asyncio.ensure_future(held[1].aclose())
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=60)
            transport = httpx.AsyncHTTPTransport(uds=self.server.socket_path, limits=limits)
            held = self._clients[id(loop)] = (start, httpx.AsyncClient(
                transport=transport, timeout=httpx.Timeout(self.request_timeout_s + 30, connect=10)))
        return held[1]

    def in_flight(self) -> int:
        """vLLM calls not yet ended."""
        return sum(not t.done() for t in self.tasks)

    def close(self) -> None:
        """Stop vLLM; rows still waiting (in line or paused) get a 503, rows in vLLM end as its connection closes."""
        with self.rows_lock:
            waiting = [r for r in self.rows if r.state in (LINE, PAUSED)]
            for row in waiting:
                row.state = DONE
        for row in waiting:
            row.request.push(row.index, shutting_down())
        self.loader.stop()
        self.server.stop()


@dataclass(frozen=True)
class VllmConstraint:
    """A constraint as vLLM takes it (``body``: its ``structured_outputs``) and as compiled here (``compiled``:
    the same spec under llguidance with this tokenizer, which checks finished answers)."""

    body: dict
    compiled: object


def engine_args() -> tuple[str, ...]:
    """What tunesmith's requests need of vLLM's engine (vLLM 0.32).

    Priority scheduling: each request's priority is the number of its tenant's rows already in vLLM
    (:meth:`VllmEngine._start`), so within what tunesmith sends (each tenant's share) a tenant's first row goes
    before another's tenth.

    Structured outputs by llguidance (``guidance``), the built-in engine's library, with compact JSON. Under
    ``auto`` vLLM picks a backend per request, but its engine builds one, for the first request that arrives
    (vllm-project/vllm#43920): a schema that vLLM sends to guidance because xgrammar lacks a keyword in it
    (``multipleOf``; ``pattern`` or ``format`` beside a length bound) was compiled by xgrammar all the same when
    another request came first. The request-level ``disable_any_whitespace`` is read by neither backend (only the
    server's setting is). Lark grammars (a JSON answer or tool calls) are llguidance's.

    On a CPU, chunked prefill off: a request with a ``seed`` whose prompt vLLM splits over two steps kills vLLM's
    engine there ("CPU Generator does not use offset": the model runner rewinds that request's generator with a
    call only CUDA generators have). 30 structured requests at once did, and so does one seeded prompt longer than
    the step's 2,048 tokens (tests/test_structured_outputs.py). Without chunking vLLM makes a step as long as the
    context, and a prompt waits for a step with room for all of it."""
    import torch

    args = ("--structured-outputs-config", json.dumps({"backend": "guidance", "disable_any_whitespace": True}),
            "--scheduling-policy", "priority")  # requests carry their tenant's rows in flight as priority
    return args if torch.cuda.is_available() else (*args, "--no-enable-chunked-prefill")


def vllm_prefill_tokens() -> int:
    """The prompt tokens a tenant may have waiting for vLLM's prefill at once: on a CPU, where vLLM prefills
    without chunks (:func:`engine_args`) and a step holding 64 new prompts took 6.5 s (every other tenant's row waits
    for the whole step), ``CPU_PREFILL_TOKENS``; on a CUDA GPU no bound."""
    import torch

    return 1 << 30 if torch.cuda.is_available() else CPU_PREFILL_TOKENS


def vllm_contended_rows() -> int:
    """The rows vLLM holds while a light tenant is present, by the device vLLM's build runs on (it follows this
    machine's): :func:`tunesmith.serve.engines.shares.default_contended_rows`."""
    import torch

    return default_contended_rows("cuda" if torch.cuda.is_available() else "cpu")


def on_loop(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
    """Call ``fn`` on ``loop``: at once from that loop's own thread, else as soon as the loop runs it; False when
    the loop is closed."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        fn(*args)
        return True
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        return False
    return True
