"""LLM clients behind one small interface: ``run(requests, on_result)``.

``OpenAIChatClient`` talks to any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp
server, ``tunesmith serve``) with the official ``openai`` client, a concurrency limit, a
requests-per-minute limit and retries with exponential backoff and full jitter on 429, 5xx,
timeouts and dropped connections. ``LocalChatClient`` runs a local Hugging Face model with
batched generation (the embedded SmolLM2 by default, fully offline).

``on_result(index, reply_or_failure)`` is called as each call finishes, so the caller can
commit it to the cache at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence

from tunesmith.clients.calls import CallFailure, ChatReply, ChatRequest
from tunesmith.clients.keys import api_key
from tunesmith.clients.retry import RetryPolicy, classify
from tunesmith.errors import ProviderError

OnResult = Callable[[int, "ChatReply | CallFailure"], None]


class RequestsPerMinute:
    """Spaces request starts evenly so that at most ``rpm`` start in any minute."""

    def __init__(self, rpm: float | None):
        self.interval = 60.0 / rpm if rpm else 0.0
        self.next_start = 0.0
        self.lock = asyncio.Lock()

    async def wait(self) -> None:
        if not self.interval:
            return
        async with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        await asyncio.sleep(start - now)


class OpenAIChatClient:
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        concurrency: int = 8,
        requests_per_minute: float | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
    ):
        self.base_url, self.model, self.api_key_env = base_url, model, api_key_env
        self.endpoint = base_url.rstrip("/")
        self.concurrency, self.rpm, self.timeout_s = concurrency, requests_per_minute, timeout_s
        self.retry = retry or RetryPolicy()
        self.retries_done = 0
        self.schema_supported = True  # until the server answers 400 to a response_format

    def _api_key(self) -> str:
        return api_key(self.api_key_env, "synth.provider.api_key_env", ProviderError)

    def run(self, requests: Sequence[ChatRequest], on_result: OnResult) -> None:
        if requests:
            asyncio.run(self._run_all(list(requests), on_result))

    async def _run_all(self, requests: list[ChatRequest], on_result: OnResult) -> None:
        import openai

        client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self._api_key(), max_retries=0, timeout=self.timeout_s
        )
        sem = asyncio.Semaphore(self.concurrency)
        limiter = RequestsPerMinute(self.rpm)

        async def one(i: int, req: ChatRequest) -> None:
            async with sem:
                on_result(i, await self._call_with_retries(client, req, limiter))

        try:
            async with asyncio.TaskGroup() as group:
                for i, req in enumerate(requests):
                    group.create_task(one(i, req))
        except* ProviderError as eg:
            raise eg.exceptions[0] from None
        finally:
            await client.close()

    async def _call_with_retries(self, client, req: ChatRequest, limiter: RequestsPerMinute):
        """Retry what may pass later (429, 5xx, timeouts, dropped connections); a bad request is that
        request's failure; a refused key, access or model stops the run (every call would fail)."""
        last: CallFailure | None = None
        for attempt in range(self.retry.max_retries + 1):
            await limiter.wait()
            try:
                return await self._call(client, req)
            except Exception as exc:
                err = classify(exc, self.endpoint, self.timeout_s)
                if err is None:
                    raise
                if err.kind == "bad_request" and req.schema and self.schema_supported:
                    self.schema_supported = False  # the server rejects json_schema: ask in plain text, parse tolerantly
                    return await self._call_with_retries(client, req, limiter)
                if err.kind in ("auth", "forbidden", "not_found"):
                    raise ProviderError(self._fatal(err)) from exc
                failure = CallFailure(err.kind, err.describe(), attempt)
                if not err.retryable:
                    return failure
                last = failure
                wait = self.retry.delay(attempt, err.retry_after)
            if attempt < self.retry.max_retries:
                self.retries_done += 1
                await asyncio.sleep(wait)
        if last.kind == "connection":
            raise ProviderError(f"{last.message} (gave up after {self.retry.max_retries} retries); is the server up?")
        return last

    def _fatal(self, err) -> str:
        if err.kind == "auth":
            return f"{self.endpoint} rejected the API key (401). Put a valid key in ${self.api_key_env}."
        if err.kind == "forbidden":
            return f"{self.endpoint} refused access (403): {err.message}"
        return f"{self.endpoint} answered 404 for model '{self.model}': check synth.provider.base_url and model."

    async def _call(self, client, req: ChatRequest) -> ChatReply:
        extra = {}
        if req.schema and self.schema_supported:
            extra["response_format"] = {
                "type": "json_schema", "json_schema": {"name": "reply", "schema": json.loads(req.schema), "strict": False}
            }
        resp = await client.chat.completions.create(
            model=self.model,
            messages=req.message_dicts(),
            temperature=req.temperature,
            top_p=req.top_p,
            max_tokens=req.max_tokens,
            seed=req.effective_seed,
            n=req.n,
            **extra,
        )
        if not getattr(resp, "choices", None):
            raise ValueError("no choices in the reply")
        usage = resp.usage
        return ChatReply(
            [c.message.content or "" for c in resp.choices],
            getattr(usage, "prompt_tokens", 0) or 0,
            getattr(usage, "completion_tokens", 0) or 0,
        )


class LocalChatClient:
    """A local HF causal LM; all requests go through the project's one generation engine together, each with
    its own sampling settings and seed (continuous batching); a request with a schema is decoded under it."""

    def __init__(self, model: str = "smollm2-135m-instruct", batch_size: int = 8, precision: str = "auto",
                 constrained: bool = True, engine: str = "builtin"):
        self.model, self.batch_size, self.precision, self.constrained = model, batch_size, precision, constrained
        self.endpoint = ("local" if constrained else "local-unconstrained") + ("" if engine == "builtin" else f"@{engine}")
        self.retries_done = 0
        self._loaded = None
        self._constraints: dict[str, object] = {}

    def _load(self):
        if self._loaded is None:
            from tunesmith.generation import remote
            from tunesmith.machine.placement import pick_placement
            from tunesmith.models.loading import load_model, load_tokenizer

            load = lambda: load_model(self.model, pick_placement(self.precision))  # noqa: E731
            server = remote.active()
            model = remote.RemoteModel(server, server.base_name(), load) if server is not None else load()
            self._loaded = (model, load_tokenizer(self.model))
        return self._loaded

    def _constraint(self, schema: str | None):
        if not (schema and self.constrained):
            return None
        model, _ = self._load()
        if getattr(type(model), "remote", False):  # decoded under the schema on the engine
            from tunesmith.generation.remote import RemoteSchema

            return RemoteSchema(json.loads(schema))
        if schema not in self._constraints:
            from tunesmith.generation import stop_ids
            from tunesmith.generation.constrained import JsonConstraint

            model, tok = self._load()
            self._constraints[schema] = JsonConstraint(tok, model.config.vocab_size, stop_ids(tok, model), json.loads(schema))
        return self._constraints[schema]

    @staticmethod
    def _token_limit(max_tokens: int, schema: str) -> int:
        """Under a bounded schema a reply may run past ``max_tokens`` up to the schema's own bound, so that
        it is never cut mid-JSON (a Hangul character can take three tokens); the string limits keep it short."""
        from tunesmith.generation.constrained import reply_token_bound

        bound = reply_token_bound(json.loads(schema))
        return max(max_tokens, bound) if bound else max_tokens

    def run(self, requests: Sequence[ChatRequest], on_result: OnResult) -> None:
        from tunesmith.generation import complete

        if not requests:
            return
        model, tok = self._load()
        prompts = [self._prompt(tok, r) for r in requests]
        complete(model, tok, prompts, self.batch_size,
                 on_done=lambda i, g: on_result(i, ChatReply([t.strip() for t in g.texts], g.prompt_tokens,
                                                             g.completion_tokens)))

    def _prompt(self, tok, r: ChatRequest):
        """The request as one engine prompt: its chat text, settings, ``n`` and schema constraint."""
        from tunesmith.generation import GenParams, Prompt

        text = tok.apply_chat_template(r.message_dicts(), tokenize=False, add_generation_prompt=True)
        constraint = self._constraint(r.schema)
        limit = self._token_limit(r.max_tokens, r.schema) if constraint else r.max_tokens
        params = GenParams(limit, r.temperature, r.top_p, seed=r.effective_seed)
        return Prompt(tok(text, add_special_tokens=False)["input_ids"], params, r.n, constraint=constraint)
