"""A key's limits over replicas on one PostgreSQL: its requests in flight and its tokens a minute, counted over
every replica (two real servers on one database), and refused with a 503 when the count cannot be read."""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager

import openai
import pytest

from tunesmith.serve.api.rate_limits import KeyLimits
from tunesmith.serve.app import ServeSettings, create_app
from tunesmith.serve.engines.builtin import Engine

from .conftest import http_get, running_server

pytestmark = pytest.mark.replicas  # several servers on one PostgreSQL: make test-replicas runs them

KEYS = frozenset({"k1", "k2"})
MESSAGES = [{"role": "user", "content": "tell me a long story"}]


@contextmanager
def replicas(model_dir, data_dir, url: str, limits: KeyLimits, count: int = 2):
    """``count`` servers of ``model_dir`` on the database at ``url`` with ``limits`` per key; yields (their base
    URLs, their apps)."""
    model = str(model_dir)
    with ExitStack() as stack:
        urls, apps = [], []
        for _ in range(count):
            settings = ServeSettings(model=model, api_keys=KEYS, data_dir=data_dir, database=url, key_limits=limits)
            apps.append(create_app(settings, Engine(model, {}, max_batch=8, wait_ms=1)))
            urls.append(stack.enter_context(running_server(apps[-1])))
        yield urls, apps


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def test_a_keys_requests_in_flight_are_limited_over_both_replicas(tiny_model_dir, tmp_path, postgres):
    model = str(tiny_model_dir)
    with replicas(tiny_model_dir, tmp_path / "shared", postgres(), KeyLimits(requests=2)) as (urls, _):
        one, two = client(urls[0], "k1"), client(urls[1], "k1")
        streams = [one.chat.completions.create(model=model, messages=MESSAGES, max_tokens=400, stream=True,
                                               temperature=1.0)
                   for _ in range(2)]
        for s in streams:
            next(iter(s))  # admitted and generating on replica one
        with pytest.raises(openai.RateLimitError, match="over all replicas"):
            two.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
        other = client(urls[1], "k2")
        assert other.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2).choices  # another key
        for s in streams:
            for _ in s:
                pass
        assert two.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2).choices  # places given back


def test_a_keys_tokens_a_minute_spent_on_one_replica_are_refused_on_the_other(tiny_model_dir, tmp_path, postgres):
    """300 tokens a minute: k1's request of 200 (and its prompt) on replica one leaves it too few for another of
    100 on replica two (a 429 naming tokens a minute, its headers counting replica one's spend); a small one still
    fits, and k2 is served on replica two meanwhile."""
    model = str(tiny_model_dir)
    with replicas(tiny_model_dir, tmp_path / "shared", postgres(), KeyLimits(tokens_per_minute=300)) as (urls, _):
        one, two = client(urls[0], "k1"), client(urls[1], "k1")
        charged = time.monotonic()  # at the latest: the first request's tokens are charged after it is sent
        raw = one.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, max_tokens=200)
        assert raw.parse().choices
        left = int(raw.headers["x-ratelimit-remaining-tokens"])
        prompt = 300 - 200 - left  # the prompt's tokens: the rest of the charge
        assert raw.headers["x-ratelimit-limit-tokens"] == "300" and 0 < prompt <= 49, raw.headers
        with pytest.raises(openai.RateLimitError) as refused:
            two.chat.completions.create(model=model, messages=MESSAGES, max_tokens=100)
        body, headers = refused.value.body, refused.value.response.headers
        assert body["type"] == "tokens" and body["code"] == "rate_limit_exceeded", body
        assert f"{300 - left} of 300 tokens a minute used" in body["message"], body
        assert headers["x-ratelimit-remaining-tokens"] == str(left)
        since = time.monotonic() - charged  # when replica one's spend leaves the minute (counted per whole second)
        assert 60 - since - 1 <= int(headers["retry-after"]) <= 62, (since, headers)
        other = client(urls[1], "k2").chat.completions.with_raw_response.create(model=model, messages=MESSAGES,
                                                                                max_tokens=100)
        assert other.parse().choices and other.headers["x-ratelimit-remaining-tokens"] == str(300 - 100 - prompt)
        small = two.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, max_tokens=2)
        assert small.parse().choices  # within what is left: the minute is a sum, not a block
        assert small.headers["x-ratelimit-remaining-tokens"] == str(left - 2 - prompt)
        with pytest.raises(openai.RateLimitError, match="tokens a minute used"):  # replica one sees both spends
            one.chat.completions.create(model=model, messages=MESSAGES, max_tokens=left - prompt)


def test_tokens_over_replicas_are_refused_with_a_503_when_the_database_is_unreachable(tiny_model_dir, tmp_path,
                                                                                        postgres):
    """The store's database gone: a request that would spend tokens is a 503 ``limits_unavailable`` naming tokens
    a minute, never counted by the replica alone."""
    model = str(tiny_model_dir)
    with replicas(tiny_model_dir, tmp_path / "shared", postgres(), KeyLimits(tokens_per_minute=300),
                  count=1) as (urls, apps):
        k1 = client(urls[0], "k1")
        assert k1.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2).choices
        root = urls[0].removesuffix("/v1")
        assert http_get(f"{root}/ready")[0] == 200 and http_get(f"{root}/health")[0] == 200  # no key needed
        apps[0].state.store.db.close()  # every connection of the store closed: the database cannot be reached
        with pytest.raises(openai.InternalServerError) as refused:
            k1.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
        assert refused.value.status_code == 503 and refused.value.body["code"] == "limits_unavailable"
        assert "tokens a minute across replicas" in refused.value.body["message"]
        status, body = http_get(f"{root}/ready")  # the load balancer sends traffic elsewhere
        assert status == 503 and b"the store did not answer" in body, body
        assert http_get(f"{root}/health")[0] == 200  # alive: not a reason to restart it


def test_a_keys_tokens_are_summed_over_replicas_and_leave_with_the_minute(postgres, tmp_path):
    """SharedPlaces.spend on two replicas: one key's seconds summed over both, another key apart, a second counted
    until the minute after its end has passed (in the database's clock: the key's seconds are aged in the table),
    and seconds long past deleted by a replica's renewal."""
    import tunesmith.serve.api.shared_limits as shared_limits
    from tunesmith.serve.errors import APIError
    from tunesmith.serve.store import Store

    store = Store(tmp_path / "data", postgres())
    one, two = shared_limits.SharedPlaces(store, "r1"), shared_limits.SharedPlaces(store, "r2")

    def age(seconds: int) -> None:  # the key's seconds as if that much older
        store.db.execute("UPDATE key_tokens SET bucket = bucket - ? WHERE owner = 'k'", (seconds,))

    charged, window = one.spend("k", 60, 100, 60.0)
    assert charged and [n for _, n in window] == [60] and -1.0 <= window[0][0] <= 0.0  # this second: ends ahead
    assert not two.spend("k", 50, 100, 60.0)[0]  # 60 + 50 > 100, whichever replica asks
    assert two.spend("other", 100, 100, 60.0)[0]  # another key counts apart
    charged, window = two.spend("k", 40, 100, 60.0)
    assert charged and sum(n for _, n in window) == 100
    age(59)  # the minute after the first second's end has not passed
    assert not one.spend("k", 1, 100, 60.0)[0]
    age(2)  # now it has: every one of its tokens has left
    charged, window = one.spend("k", 60, 100, 60.0)
    assert charged and [n for _, n in window] == [60]
    rows = lambda: store.db.execute("SELECT COUNT(*) FROM key_tokens").fetchone()[0]  # noqa: E731
    assert rows() >= 3
    store.db.execute("UPDATE key_tokens SET bucket = bucket - ? WHERE owner = 'other'",
                     (int(shared_limits.TOKENS_KEPT_S) + 5,))
    age(int(shared_limits.TOKENS_KEPT_S) + 5)
    one.spend("k", 1, 100, 60.0)
    one.renew()
    assert rows() == 1  # only the last second is within TOKENS_KEPT_S
    store.db.close()
    with pytest.raises(APIError) as gone:  # the database gone: refused and said, never counted per replica
        one.spend("k", 1, 100, 60.0)
    assert gone.value.status == 503 and gone.value.body["code"] == "limits_unavailable"


def test_a_slow_shared_count_stalls_no_other_request(tiny_model_dir, tmp_path, postgres):
    """The count over replicas is a database transaction: while k1's waits 3 s (a database under a lock, or being
    reached), another key's stream on the same replica starts at once (the count runs in a thread, never on the
    event loop)."""
    import threading

    model = str(tiny_model_dir)
    with replicas(tiny_model_dir, tmp_path / "shared", postgres(), KeyLimits(requests=4), count=1) as (urls, apps):
        shared = apps[0].state.limiter.shared
        take, entered = shared.take, threading.Event()

        def slowed(owner, limit):  # the first count (k1's) waits
            entered.set()
            time.sleep(3)
            return take(owner, limit)

        shared.take = slowed
        slow = threading.Thread(target=lambda: client(urls[0], "k1").chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=2))
        slow.start()
        assert entered.wait(30)
        shared.take = take
        started = time.monotonic()
        stream = client(urls[0], "k2").chat.completions.create(model=model, messages=MESSAGES, max_tokens=8,
                                                               stream=True)
        assert next(iter(stream)) is not None and time.monotonic() - started < 1.5, time.monotonic() - started
        for _ in stream:
            pass
        slow.join(30)
