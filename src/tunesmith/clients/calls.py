"""The request and reply types every LLM client speaks, and the cache key of a request."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ChatRequest:
    """One chat-completion call. ``attempt`` > 0 marks a retry after an unparseable reply."""

    messages: tuple[tuple[str, str], ...]  # (role, content) pairs, hashable
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    n: int = 1
    attempt: int = 0
    schema: str | None = None  # JSON Schema (a JSON string) the reply must follow, when the task expects JSON

    @classmethod
    def chat(cls, messages: list[dict], **sampling) -> ChatRequest:
        return cls(messages=tuple((m["role"], m["content"]) for m in messages), **sampling)

    def message_dicts(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.messages]

    @property
    def effective_seed(self) -> int | None:
        """The seed sent to the model: a retry must not get the very same sample back."""
        return None if self.seed is None else self.seed + 1009 * self.attempt

    def cache_key(self, endpoint: str, model: str) -> str:
        doc = {"endpoint": endpoint, "model": model, **asdict(self)}
        doc["messages"] = [list(m) for m in self.messages]
        if doc["schema"] is None:  # keys of free-text calls stay those of earlier versions (caches resume)
            del doc["schema"]
        return hashlib.sha256(json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass
class ChatReply:
    texts: list[str]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False

    @property
    def text(self) -> str:
        return self.texts[0] if self.texts else ""


@dataclass
class CallFailure:
    """A call that still failed after its retries; reported per request, never cached."""

    kind: str  # an EndpointError kind: "rate_limit", "server", "timeout", "connection", "bad_request", "bad_response"
    message: str
    retries: int = 0


@dataclass
class CallStats:
    requests: int = 0
    cache_hits: int = 0
    calls_made: int = 0
    retries: int = 0  # transport retries plus re-asks after an unusable reply
    reasks: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0
    failure_kinds: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)
