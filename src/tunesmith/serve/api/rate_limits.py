"""Per-key limits on inference requests: how many of one key's requests may be in flight at once, and how many
tokens (prompt plus the most the answer may generate, as OpenAI counts them) its requests may ask for in a
minute. Past either the request is a 429 in OpenAI's shape, with ``retry-after``/``retry-after-ms`` and
OpenAI's ``x-ratelimit-*`` headers, which the official clients read to wait and retry.

Set with ``tunesmith serve --requests-per-key`` and ``--tokens-per-minute-per-key`` (the defaults:
``ServeSettings.limits_per_key``). The engines share their batch round robin over keys either way
(:meth:`tunesmith.serve.engines.interface.InferenceEngine.submit`); the limits bound what one key can make the batch
hold at all. The limiter's own bookkeeping runs on the event loop. With replicas on one PostgreSQL a key's requests
in flight and its tokens a minute are counted over all of them (:mod:`tunesmith.serve.api.shared_limits`); the
routes take those counts through :meth:`KeyLimiter.admitted` and :meth:`Ticket.charged`, whose database
transactions run in the admission lane (a few threads, one key's at a time).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter, deque
from dataclasses import dataclass

from tunesmith.serve.api.body_limit import send_error
from tunesmith.serve.errors import APIError

WINDOW_S = 60.0
MAX_WAIT_S = 60.0  # the longest retry-after a requests refusal asks for
RETRIES_PER_S = 10.0  # how often, at most, one key's crowd of refused clients comes back, all of them together


@dataclass(frozen=True)
class KeyLimits:
    requests: int | None = None  # one key's inference requests in flight at once
    tokens_per_minute: int | None = None  # prompt + max generated tokens of one key's requests in a minute

    @property
    def on(self) -> bool:
        return self.requests is not None or self.tokens_per_minute is not None


class Ticket:
    """One admitted request: holds its key's place until released (once)."""

    def __init__(self, limiter: KeyLimiter, key: str | None, held: bool = True):
        self.limiter, self.key, self.held = limiter, key, held
        self.counted, self.since = held, limiter.clock()

    def charge(self, tokens: int) -> None:
        """Count the request's tokens against its key's minute; a 429 (and the place let go) past the limit."""
        if not self.counted:
            return
        try:
            self.limiter.charge(self.key, tokens)
        except APIError:
            self.release()
            raise

    async def charged(self, tokens: int) -> None:
        """:meth:`charge` from the event loop: with replicas, the database's sum is read in a thread."""
        if not self.counted:
            return
        try:
            await self.limiter.charged(self.key, tokens)
        except APIError:
            self.release()
            raise

    @property
    def headers(self) -> dict[str, str]:
        return self.limiter.headers(self.key)

    def release(self) -> None:
        if self.held:
            self.held = False
            self.limiter.release(self.key, self.since)


class KeyLimiter:
    def __init__(self, limits: KeyLimits, clock=time.monotonic, jitter=random.random):
        self.limits, self.clock, self.jitter = limits, clock, jitter
        self.in_flight: Counter = Counter()
        self.spent: dict[str | None, deque[tuple[float, int]]] = {}  # key -> (when, tokens) within the window
        self.typical_s: dict[str | None, float] = {}  # key -> how long its requests hold their place (moving mean)
        self.oldest: dict[str | None, deque[float]] = {}  # key -> when its requests in flight were admitted, in order
        self.refused: dict[str | None, deque[float]] = {}  # key -> when its recent requests were refused (429)
        self.spreads: dict[str | None, float] = {}  # key -> the spread its last refusal was told
        self.freed: dict[str | None, deque] = {}  # key -> futures of refusals held until one of its places frees
        self.shared = None  # replicas on one PostgreSQL: their places (tunesmith.serve.api.shared_limits)

    def admit(self, key: str | None, counted: bool = True) -> Ticket:
        """A place for one of ``key``'s requests, or a 429 when it already has its limit in flight; a request
        not ``counted`` (a batch's line: its batch bounds them) holds none."""
        if not counted:
            return Ticket(self, key, held=False)
        # a place frees when one of them ends: come back after about one request's time, not at once (a crowd of
        # clients retrying every second costs the server more than their requests would), each at its own moment
        if refusal := self.full(key):
            raise refusal
        over_all = self.shared is not None and self.limits.requests is not None  # the limit over every replica
        return self._admitted(key, self.shared.take(key, self.limits.requests) if over_all else None)

    async def admitted(self, key: str | None, counted: bool = True) -> Ticket:
        """:meth:`admit` from the event loop: with replicas, the place over all of them is taken in a thread (a
        database transaction, or an unreachable database's wait, never stalls every key's requests)."""
        if not counted or self.shared is None or self.limits.requests is None:
            return self.admit(key, counted)
        if refusal := self.full(key):
            raise refusal
        used = await self.shared.lane.run(key, self.shared.take, key, self.limits.requests)
        return self._admitted(key, used)

    def _admitted(self, key: str | None, used: int | None) -> Ticket:
        """The ticket, or a 429 when the replicas' count ``used`` (None: a place was taken) was at the limit."""
        if used is not None:
            raise self._refusal(key, "requests", f"{used} requests in flight over all replicas (limit "
                                f"{self.limits.requests} at once)", max(1.0, self.typical_s.get(key, 1.0)))
        self.in_flight[key] += 1
        ticket = Ticket(self, key)
        self.oldest.setdefault(key, deque()).append(ticket.since)
        return ticket

    def full(self, key: str | None) -> APIError | None:
        """The 429 a request of ``key`` would get for its requests in flight now, or None."""
        limit = self.limits.requests
        if limit is None or self.in_flight[key] < limit:
            return None
        # spread over one more request's time: refused clients told the same moment would come back together. Before
        # any of the key's requests has ended, its typical time is at least how long the oldest in flight has run
        # (a flood's first requests: told "1 s" each, its refused crowd would come back many times a second)
        typical = self.typical_s.get(key)
        if typical is None:
            typical = self.clock() - self.oldest[key][0] if self.oldest.get(key) else 1.0
        typical = max(1.0, typical)
        wait = min(MAX_WAIT_S, typical + self.jitter() * self._spread(key, typical))
        return self._refusal(key, "requests", f"{self.in_flight[key]} requests in flight (limit {limit} at once)", wait)

    def _spread(self, key: str | None, typical: float) -> float:
        """Over how many seconds this refusal's client is told to come back: one request's time, or, for a crowd of
        refused clients, as long as it takes :data:`RETRIES_PER_S` of them a second to come back in turn (each
        client is seen at least once in the last ``typical`` + spread seconds, so their count there is the crowd's).
        A freed place still meets a retry within about ``1 / RETRIES_PER_S`` seconds."""
        now = self.clock()
        # at most as many as make the longest spread: a key refused thousands of times a second holds no more
        refused = self.refused.setdefault(key, deque(maxlen=int(RETRIES_PER_S * MAX_WAIT_S / 2) + 1))
        refused.append(now)
        while refused and refused[0] < now - typical - self.spreads.get(key, typical):
            refused.popleft()
        self.spreads[key] = spread = min(MAX_WAIT_S, max(typical, 2 * len(refused) / RETRIES_PER_S))
        return spread

    def next_free(self, key: str | None):
        """A future done when one of ``key``'s places frees (the first held refusal waiting is woken; the event
        loop's own future)."""
        import asyncio

        waiter = asyncio.get_running_loop().create_future()
        self.freed.setdefault(key, deque()).append(waiter)
        return waiter

    def release(self, key: str | None, since: float) -> None:
        """One of ``key``'s requests, admitted at ``since``, ends: its place is free (a held refusal waiting for
        it is woken), its time counts."""
        waiting = self.freed.get(key)
        while waiting:
            waiter = waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break
        if waiting is not None and not waiting:
            del self.freed[key]
        if self.shared is not None and self.limits.requests is not None:
            self.shared.give_back(key)
        self.in_flight[key] -= 1
        if self.in_flight[key] <= 0:
            del self.in_flight[key]
        started = self.oldest.get(key)
        if started and since in started:
            started.remove(since)
            if not started:
                del self.oldest[key]
        held_s = self.clock() - since
        before = self.typical_s.get(key)
        self.typical_s[key] = held_s if before is None else 0.8 * before + 0.2 * held_s

    def charge(self, key: str | None, tokens: int) -> None:
        """``tokens`` counted against ``key``'s minute, or a 429 when they would take it past its limit. With
        replicas the store's sum over all of them decides (a 503 when it cannot be reached), and the key's window
        it read is kept here for the headers."""
        limit = self.limits.tokens_per_minute
        if limit is None:
            return
        if self.shared is not None:
            return self._spent(key, tokens, limit, *self.shared.spend(key, tokens, limit, WINDOW_S))
        window = self._window(key)
        used = sum(n for _, n in window)
        if used + tokens > limit:
            raise self._over(key, window, used, tokens, limit)
        window.append((self.clock(), tokens))

    async def charged(self, key: str | None, tokens: int) -> None:
        """:meth:`charge` from the event loop: with replicas, the database's sum is read in a thread."""
        limit = self.limits.tokens_per_minute
        if limit is None or self.shared is None:
            return self.charge(key, tokens)
        self._spent(key, tokens, limit, *await self.shared.lane.run(key, self.shared.spend, key, tokens, limit, WINDOW_S))

    def _spent(self, key: str | None, tokens: int, limit: int, charged: bool, seconds) -> None:
        """The key's window as the replicas' sum read it, kept for the headers; a 429 when it was not charged."""
        now = self.clock()
        self.spent[key] = window = deque((now - age, n) for age, n in seconds)
        if not charged:
            raise self._over(key, window, sum(n for _, n in window), tokens, limit)

    def _over(self, key: str | None, window: deque, used: int, tokens: int, limit: int) -> APIError:
        """The 429 of a request whose ``tokens`` would take ``key``'s minute (``used`` of ``limit``) past it."""
        if tokens > limit:
            return self._refusal(key, "tokens", f"this request asks for {tokens} tokens (prompt and max_tokens), "
                                 f"more than the {limit} a minute allowed; lower max_tokens", WINDOW_S)
        wait = self._until_room(window, used + tokens - limit)
        return self._refusal(key, "tokens", f"{used} of {limit} tokens a minute used; this request asks for "
                             f"{tokens}", wait)

    def headers(self, key: str | None) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for ``key`` now (only the limits that are on). With replicas, its tokens
        are those of the window read at this replica's last charge of the key (a request's own answer: its own)."""
        out = {}
        if self.limits.requests is not None:
            out |= {"x-ratelimit-limit-requests": str(self.limits.requests),
                    "x-ratelimit-remaining-requests": str(max(0, self.limits.requests - self.in_flight[key])),
                    "x-ratelimit-reset-requests": "1s"}
        if self.limits.tokens_per_minute is not None:
            window = self._window(key)
            used = sum(n for _, n in window)
            reset = self._until_room(window, used) if used else 0.0
            out |= {"x-ratelimit-limit-tokens": str(self.limits.tokens_per_minute),
                    "x-ratelimit-remaining-tokens": str(max(0, self.limits.tokens_per_minute - used)),
                    "x-ratelimit-reset-tokens": f"{reset:.3f}s"}
        return out

    def _window(self, key: str | None) -> deque:
        window = self.spent.setdefault(key, deque())
        now = self.clock()
        while window and window[0][0] <= now - WINDOW_S:
            window.popleft()
        return window

    def _until_room(self, window: deque, excess: int) -> float:
        """Seconds until ``excess`` tokens of the window have left it."""
        freed, now = 0, self.clock()
        for when, n in window:
            freed += n
            if freed >= excess:
                return max(0.001, when + WINDOW_S - now)
        return WINDOW_S

    def _refusal(self, key: str | None, kind: str, what: str, wait_s: float) -> APIError:
        headers = self.headers(key) | {"retry-after": str(max(1, math.ceil(wait_s))),
                                       "retry-after-ms": str(max(1, int(wait_s * 1000)))}
        return APIError(429, f"Rate limit reached for this API key on {kind}: {what}. Retry after {wait_s:.1f} s.",
                        type_=kind, code="rate_limit_exceeded", headers=headers)


INFERENCE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


HOLD_S = 5.0  # a refusal at the edge is held up to about this long (0.5 to 1.5 times it, at random) before it is answered
MAX_HELD = 256  # refusals one key may have held at once; past them a refusal is answered at once


class EdgeLimit:
    """Pure ASGI middleware: a key already at its limit of requests in flight gets its 429 before its body is read
    or parsed, so that a crowd of refused requests costs the server next to nothing. The route still takes the
    place itself (:meth:`KeyLimiter.admit`): this is only the cheap early answer. A batch's own lines (in process)
    are never refused here.

    The refusal is held until one of the key's places frees (the request then goes on, as if it had waited in line)
    or for about :data:`HOLD_S` (at random between half and one and a half times it, so that a crowd held together
    does not come back together; never longer than the wait it would tell), then answered, its ``retry-after`` less
    the time held: a client that waits out ``retry-after`` waits no longer than before, and one that retries at once
    comes back only about once per hold per connection, instead of thousands of times a second on the event loop
    every key shares. At most :data:`MAX_HELD` are held per key; past them the refusal is answered at once, closing
    the connection."""

    def __init__(self, app, limiter_of, owner_of, clock=time.monotonic):
        self.app, self.limiter_of, self.owner_of, self.clock = app, limiter_of, owner_of, clock
        self.held: Counter = Counter()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") == "POST" and scope.get("path") in INFERENCE_PATHS \
                and "tunesmith.batch" not in scope:
            limiter = self.limiter_of()
            owner = self.owner_of(scope) if limiter is not None else None
            refusal = limiter.full(owner) if owner is not None else None
            if refusal is not None:
                refusal = await self._held(limiter, owner, refusal)
            if refusal is not None:
                return await send_error(send, 429, refusal.body, refusal.headers)
        await self.app(scope, receive, send)

    async def _held(self, limiter: KeyLimiter, owner: str, refusal: APIError) -> APIError | None:
        """The refusal after holding it (None when a place freed meanwhile), its wait less the time held."""
        if self.held[owner] >= MAX_HELD:
            refusal.headers["connection"] = "close"
            return refusal
        hold = min(HOLD_S * (0.5 + limiter.jitter()), int(refusal.headers["retry-after-ms"]) / 1000)
        start, deadline = self.clock(), self.clock() + hold
        self.held[owner] += 1
        try:
            while (left := deadline - self.clock()) > 0:
                freed = limiter.next_free(owner)
                try:
                    await asyncio.wait_for(freed, left)
                except TimeoutError:
                    break
                if limiter.full(owner) is None:
                    return None  # a place freed: the request goes on
        finally:
            self.held[owner] -= 1
            if not self.held[owner]:
                del self.held[owner]
        again = limiter.full(owner)
        if again is None:
            return None
        wait = max(0.001, int(again.headers["retry-after-ms"]) / 1000 - (self.clock() - start))
        again.headers |= {"retry-after": str(max(1, math.ceil(wait))), "retry-after-ms": str(max(1, int(wait * 1000)))}
        return again
