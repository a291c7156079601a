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
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tunesmith.errors import ProviderError
from tunesmith.synth.calls import CallFailure, ChatReply, ChatRequest

OnResult = Callable[[int, "ChatReply | CallFailure"], None]


@dataclass
class RetryPolicy:
    max_retries: int = 5
    base_s: float = 0.5
    cap_s: float = 20.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2^attempt)], never less than Retry-After."""
        jitter = random.uniform(0, min(self.cap_s, self.base_s * 2**attempt))
        return max(jitter, retry_after or 0.0)


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

    def _api_key(self) -> str:
        if not self.api_key_env:
            return "not-needed"
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ProviderError(f"No API key: set the environment variable {self.api_key_env} (synth.provider.api_key_env).")
        return key

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
        import openai

        last: CallFailure | None = None
        for attempt in range(self.retry.max_retries + 1):
            await limiter.wait()
            try:
                return await self._call(client, req)
            except openai.AuthenticationError as exc:
                raise ProviderError(
                    f"{self.endpoint} rejected the API key (401). Put a valid key in ${self.api_key_env}."
                ) from exc
            except openai.PermissionDeniedError as exc:
                raise ProviderError(f"{self.endpoint} refused access (403): {exc.message}") from exc
            except openai.NotFoundError as exc:
                raise ProviderError(
                    f"{self.endpoint} answered 404 for model '{self.model}': check synth.provider.base_url and model."
                ) from exc
            except openai.BadRequestError as exc:
                return CallFailure("bad_request", str(exc.message), attempt)
            except openai.RateLimitError as exc:
                last = CallFailure("rate_limit", "429 Too Many Requests", attempt)
                wait = self.retry.delay(attempt, _retry_after(exc))
            except openai.APITimeoutError:
                last = CallFailure("timeout", f"no reply within {self.timeout_s}s", attempt)
                wait = self.retry.delay(attempt)
            except openai.APIConnectionError as exc:
                last = CallFailure("connection", f"cannot reach {self.endpoint}: {exc.__cause__ or exc}", attempt)
                wait = self.retry.delay(attempt)
            except openai.APIStatusError as exc:
                if exc.status_code < 500:
                    return CallFailure("bad_request", f"HTTP {exc.status_code}: {exc.message}", attempt)
                last = CallFailure("server", f"HTTP {exc.status_code}", attempt)
                wait = self.retry.delay(attempt, _retry_after(exc))
            except ValueError as exc:  # a 200 whose body is not a chat completion
                return CallFailure("bad_response", f"malformed response: {exc}", attempt)
            if attempt < self.retry.max_retries:
                self.retries_done += 1
                await asyncio.sleep(wait)
        if last.kind == "connection":
            raise ProviderError(f"{last.message} (gave up after {self.retry.max_retries} retries); is the server up?")
        return last

    async def _call(self, client, req: ChatRequest) -> ChatReply:
        resp = await client.chat.completions.create(
            model=self.model,
            messages=req.message_dicts(),
            temperature=req.temperature,
            top_p=req.top_p,
            max_tokens=req.max_tokens,
            seed=req.effective_seed,
            n=req.n,
        )
        if not getattr(resp, "choices", None):
            raise ValueError("no choices in the reply")
        usage = resp.usage
        return ChatReply(
            [c.message.content or "" for c in resp.choices],
            getattr(usage, "prompt_tokens", 0) or 0,
            getattr(usage, "completion_tokens", 0) or 0,
        )


def _retry_after(exc) -> float | None:
    try:
        value = exc.response.headers.get("retry-after")
        return float(value) if value is not None else None
    except (AttributeError, ValueError):
        return None


class LocalChatClient:
    """A local HF causal LM; requests are grouped by sampling parameters and generated in batches."""

    def __init__(self, model: str = "smollm2-135m-instruct", batch_size: int = 8, precision: str = "auto"):
        self.model, self.batch_size, self.precision = model, batch_size, precision
        self.endpoint = "local"
        self.retries_done = 0
        self._loaded = None

    def _load(self):
        if self._loaded is None:
            from tunesmith.models.loading import load_model, load_tokenizer, pick_placement

            self._loaded = (load_model(self.model, pick_placement(self.precision)), load_tokenizer(self.model))
        return self._loaded

    def run(self, requests: Sequence[ChatRequest], on_result: OnResult) -> None:
        from tunesmith.synth.local import generate_chat

        if not requests:
            return
        model, tok = self._load()
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.temperature, r.top_p, r.max_tokens, r.n, r.effective_seed), []).append(i)
        for (temperature, top_p, max_tokens, n, seed), idx in groups.items():
            for start in range(0, len(idx), self.batch_size):
                batch = idx[start : start + self.batch_size]
                replies = generate_chat(
                    model, tok, [requests[i].message_dicts() for i in batch], temperature, top_p, max_tokens, n, seed
                )
                for i, reply in zip(batch, replies, strict=True):
                    on_result(i, reply)
