"""What the clients of OpenAI-compatible endpoints share: the retry schedule and the reading of errors.

Evaluation (``tunesmith.clients.endpoint``, one thread per call in flight) and synthetic data
(``tunesmith.clients.chat``, asyncio) call endpoints differently, and react differently to a
failure that retrying cannot fix (evaluation scores that example wrong and goes on; synthesis
stops, since every later call would fail the same way). Which errors are worth retrying, how long
to wait, and what to call them is the same for both and lives here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class RetryPolicy:
    max_retries: int = 5
    base_s: float = 0.5
    cap_s: float = 20.0
    jitter: bool = True

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Exponential backoff, min(cap, base * 2^attempt) — uniform below it with full jitter — never
        less than the server's Retry-After."""
        top = min(self.cap_s, self.base_s * 2**attempt)
        return max(random.uniform(0, top) if self.jitter else top, retry_after or 0.0)


@dataclass
class EndpointError:
    """One failed call, classified. ``kind``: auth, forbidden, not_found, bad_request, rate_limit,
    timeout, connection, server or bad_response."""

    kind: str
    message: str
    retryable: bool
    status: int | None = None
    retry_after: float | None = None

    def describe(self) -> str:
        return f"HTTP {self.status} ({self.kind}): {self.message}" if self.status else f"{self.kind}: {self.message}"


def classify(exc: BaseException, endpoint: str, timeout_s: float) -> EndpointError | None:
    """An ``openai`` client exception (or a malformed reply's ValueError) as an EndpointError;
    ``None`` for anything else, which the caller should let through."""
    import openai

    if isinstance(exc, openai.APITimeoutError):  # before APIConnectionError, its base class
        return EndpointError("timeout", f"no reply within {timeout_s}s", True)
    if isinstance(exc, openai.APIConnectionError):
        return EndpointError("connection", f"cannot reach {endpoint}: {exc.__cause__ or exc}", True)
    if isinstance(exc, openai.APIStatusError):
        status, message, after = exc.status_code, str(exc.message)[:300], retry_after(exc)
        if status == 429:
            return EndpointError("rate_limit", message, True, status, after)
        if status >= 500:
            return EndpointError("server", message, True, status, after)
        kind = {401: "auth", 403: "forbidden", 404: "not_found"}.get(status, "bad_request")
        return EndpointError(kind, message, False, status)
    if isinstance(exc, ValueError):  # a 200 whose body is not a chat completion
        return EndpointError("bad_response", f"malformed response: {exc}", False)
    return None


def retry_after(exc) -> float | None:
    """The Retry-After header of an HTTP error, in seconds, when the server sent one."""
    try:
        value = exc.response.headers.get("retry-after")
        return float(value) if value is not None else None
    except (AttributeError, ValueError):
        return None
