"""Any OpenAI-compatible chat endpoint as a contender (a hosted model, a vLLM server, our own).

Calls go through the official ``openai`` client with its own retries off: we retry 429, 5xx,
timeouts and dropped connections ourselves (``tunesmith.clients.retry``: the same classification as
the synth client, doubling waits without jitter, at least the server's Retry-After) so the
schedule is ours to configure and test. A call that still fails is reported for its example (``error``) and
scored wrong; the evaluation goes on and the report is still written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tunesmith.clients.keys import api_key
from tunesmith.clients.retry import RetryPolicy, classify
from tunesmith.config import EndpointSpec


@dataclass
class Reply:
    text: str | None  # None when every attempt failed
    error: str | None
    attempts: int


class EndpointClient:
    """Greedy (temperature 0) chat completions with retries; thread-safe for concurrent calls."""

    def __init__(self, spec: EndpointSpec, sleep: Callable[[float], None] = time.sleep):
        from openai import OpenAI

        key = api_key(spec.api_key_env, f"eval.endpoints[{spec.name}].api_key_env")
        self.spec = spec
        self.sleep = sleep
        self.retry = RetryPolicy(spec.max_retries, spec.backoff_s, cap_s=60.0, jitter=False)
        self.client = OpenAI(
            base_url=spec.base_url, api_key=key, timeout=spec.timeout_s, max_retries=0
        )

    def served_parent(self) -> str | None:
        """The base model the server names as ``parent`` of ``spec.model`` in ``/v1/models`` (tunesmith serve
        and vLLM list each adapter so); None when it names none or the list cannot be read."""
        try:
            for m in self.client.models.list():
                if m.id == self.spec.model:
                    return (m.model_extra or {}).get("parent") or None
        except Exception:  # noqa: BLE001 - a server without a model list serves no known fine-tune
            return None
        return None

    def chat(self, messages: list[dict], max_tokens: int) -> Reply:
        """One greedy reply; what may pass later (429, 5xx, timeouts, dropped connections) is retried
        with doubling waits, anything else is this example's error at once."""
        last = ""
        for attempt in range(self.spec.max_retries + 1):
            try:
                resp = self.client.chat.completions.create(
                    model=self.spec.model, messages=messages, max_tokens=max_tokens, temperature=0
                )
                if not getattr(resp, "choices", None):
                    raise ValueError("no choices in the reply")
                return Reply(resp.choices[0].message.content or "", None, attempt + 1)
            except Exception as exc:
                err = classify(exc, self.spec.base_url, self.spec.timeout_s)
                if err is None:
                    raise
                if not err.retryable:
                    return Reply(None, err.describe(), attempt + 1)
                last = err.describe()
                if attempt < self.spec.max_retries:
                    self.sleep(self.retry.delay(attempt, err.retry_after))
        return Reply(None, f"{last} after {self.spec.max_retries + 1} attempt(s)", self.spec.max_retries + 1)

    def chat_many(
        self,
        conversations: Sequence[list[dict]],
        max_tokens: int,
        advance: Callable[[int], None] = lambda n: None,
    ) -> list[Reply]:
        """One reply per conversation, in order, ``spec.concurrency`` calls in flight."""

        def one(messages):
            reply = self.chat(messages, max_tokens)
            advance(1)
            return reply

        with ThreadPoolExecutor(max_workers=self.spec.concurrency) as pool:
            return list(pool.map(one, conversations))
