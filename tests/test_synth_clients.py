"""LLM client, call cache and structured replies against a dummy OpenAI-compatible server."""

import json

import pytest
from pydantic import BaseModel

from tunesmith.clients.calls import CallFailure, ChatRequest
from tunesmith.clients.chat import OpenAIChatClient
from tunesmith.clients.retry import RetryPolicy
from tunesmith.errors import ProviderError
from tunesmith.synth.cache import CallCache, run_calls
from tunesmith.synth.structured import extract_json, run_structured

from .chat_server import DummyChatServer

FAST = RetryPolicy(max_retries=3, base_s=0.01, cap_s=0.02)


def echo(messages):
    return "re: " + messages[-1]["content"]


def reqs(n):
    return [ChatRequest.chat([{"role": "user", "content": f"q{i}"}], seed=1) for i in range(n)]


def client(server, **kw):
    return OpenAIChatClient(server.base_url, "dummy", api_key_env=None, retry=FAST, **kw)


def test_calls_are_cached_and_a_rerun_makes_none(tmp_path):
    cache = CallCache(tmp_path / "c.sqlite")
    with DummyChatServer(echo) as server:
        results, stats = run_calls(client(server, concurrency=4), cache, reqs(10) + reqs(3))
        assert [r.text for r in results[:3]] == ["re: q0", "re: q1", "re: q2"]
        assert stats.calls_made == 10 and server.total_completed == 10  # duplicates made once
        again, stats2 = run_calls(client(server), cache, reqs(10))
        assert stats2.calls_made == 0 and stats2.cache_hits == 10 and server.total_completed == 10
        assert all(r.cached for r in again)


def test_429_and_500_are_retried_then_succeed(tmp_path):
    for status in (429, 500):
        with DummyChatServer(echo, fail_first=2, fail_status=status) as server:
            results, stats = run_calls(client(server), CallCache(tmp_path / f"{status}.sqlite"), reqs(5))
            assert all(r.text.startswith("re:") for r in results)
            assert stats.retries == 10 and stats.failures == 0


def test_persistent_429_is_reported_per_request_not_cached(tmp_path):
    cache = CallCache(tmp_path / "c.sqlite")
    with DummyChatServer(echo, fail_first=100) as server:
        results, stats = run_calls(client(server), cache, reqs(2))
    assert all(isinstance(r, CallFailure) and r.kind == "rate_limit" for r in results)
    assert stats.failures == 2 and len(cache) == 0


def test_401_names_the_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_KEY", "wrong")
    with DummyChatServer(echo, api_key="right") as server:
        c = OpenAIChatClient(server.base_url, "dummy", api_key_env="MY_KEY", retry=FAST)
        with pytest.raises(ProviderError, match=r"\$MY_KEY"):
            run_calls(c, CallCache(tmp_path / "c.sqlite"), reqs(1))


def test_missing_key_env_var_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("NOPE_KEY", raising=False)
    c = OpenAIChatClient("http://127.0.0.1:9/v1", "dummy", api_key_env="NOPE_KEY")
    with pytest.raises(ProviderError, match="set the environment variable NOPE_KEY"):
        run_calls(c, CallCache(tmp_path / "c.sqlite"), reqs(1))


def test_endpoint_down_is_a_provider_error(tmp_path):
    with DummyChatServer(echo) as server:
        url = server.base_url
    c = OpenAIChatClient(url, "dummy", api_key_env=None, retry=FAST)
    with pytest.raises(ProviderError, match="is the server up"):
        run_calls(c, CallCache(tmp_path / "c.sqlite"), reqs(1))


def test_malformed_response_body_is_reported(tmp_path):
    with DummyChatServer(echo, malformed=True) as server:
        results, stats = run_calls(client(server), CallCache(tmp_path / "c.sqlite"), reqs(1))
    assert isinstance(results[0], CallFailure) and stats.failures == 1


def test_extract_json_tolerates_fences_and_chatter():
    assert extract_json('Sure! ```json\n{"a": [1, 2]}\n``` hope it helps') == {"a": [1, 2]}
    assert extract_json('Here: {"a": "x}y"} and more {') == {"a": "x}y"}
    assert extract_json("[1, 2] trailing") == [1, 2]
    with pytest.raises(ValueError):
        extract_json("no json at all")


class Qs(BaseModel):
    questions: list[str]


def test_unparseable_replies_are_retried_then_set_aside(tmp_path):
    from collections import Counter

    seen: Counter = Counter()

    def flaky(messages):  # first reply to each prompt is broken, the second is valid JSON
        content = messages[-1]["content"]
        seen[content] += 1
        if content == "bad":
            return "I cannot produce JSON"
        return json.dumps({"questions": ["a?", "b?"]}) if seen[content] == 2 else "oops {not json"

    cache = CallCache(tmp_path / "c.sqlite")
    with DummyChatServer(flaky) as server:
        c = client(server, concurrency=1)
        parsed = run_structured(lambda rs: run_calls(c, cache, rs), reqs(1) + [ChatRequest.chat(
            [{"role": "user", "content": "bad"}], seed=1)], Qs, max_attempts=3)
    assert parsed[0].value == Qs(questions=["a?", "b?"]) and parsed[0].attempts == 2
    assert parsed[1].value is None and parsed[1].attempts == 3 and parsed[1].raw == "I cannot produce JSON"


def test_json_schema_is_sent_as_response_format(tmp_path):
    cache = CallCache(tmp_path / "c.sqlite")
    with DummyChatServer(lambda m: json.dumps({"questions": ["a?"]})) as server:
        parsed = run_structured(lambda rs: run_calls(client(server), cache, rs), reqs(2), Qs)
    assert [p.value for p in parsed] == [Qs(questions=["a?"])] * 2
    fmt = server.response_formats[0]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"]["properties"]["questions"]["type"] == "array"


def test_server_rejecting_response_format_falls_back_to_tolerant_parsing(tmp_path):
    cache = CallCache(tmp_path / "c.sqlite")
    with DummyChatServer(lambda m: 'Sure! ```json\n{"questions": ["a?"]}\n```', reject_response_format=True) as server:
        c = client(server, concurrency=1)
        parsed = run_structured(lambda rs: run_calls(c, cache, rs), reqs(3), Qs)
    assert [p.value for p in parsed] == [Qs(questions=["a?"])] * 3
    assert len(server.response_formats) == 1 and not c.schema_supported  # asked once, then plain text
    assert server.total_completed == 3


def test_reasks_are_counted_as_retries(tmp_path):
    from collections import Counter

    seen: Counter = Counter()

    def third_time_lucky(messages):
        seen[messages[-1]["content"]] += 1
        return json.dumps({"questions": ["a?"]}) if seen[messages[-1]["content"]] == 3 else "no"

    cache = CallCache(tmp_path / "c.sqlite")
    with DummyChatServer(third_time_lucky) as server:
        stats_box = {}

        def run(rs):
            out, stats = run_calls(client(server), cache, rs, stats_box.get("s"))
            stats_box["s"] = stats
            return out, stats

        parsed = run_structured(run, reqs(2), Qs, max_attempts=3)
    s = stats_box["s"]
    assert all(p.attempts == 3 for p in parsed) and s.reasks == 4 and s.retries == 4 and s.calls_made == 6


def test_local_constrained_replies_always_parse(tiny_model_dir):
    """A random tiny model writes noise; under the schema every reply is valid JSON of that schema."""
    from tunesmith.clients.chat import LocalChatClient
    from tunesmith.generation.constrained import bounded_schema

    schema = json.dumps(bounded_schema(Qs, max_items=2, max_chars=12))
    requests = [ChatRequest.chat([{"role": "user", "content": f"q{i}"}], temperature=t, max_tokens=60, seed=i,
                                 schema=schema) for i in range(3) for t in (0.0, 1.0)]
    out = {}
    LocalChatClient(str(tiny_model_dir), batch_size=4).run(requests, out.__setitem__)
    for i in range(len(requests)):
        Qs.model_validate_json(out[i].text)
    unconstrained = {}
    LocalChatClient(str(tiny_model_dir), batch_size=4, constrained=False).run(requests[:2], unconstrained.__setitem__)
    assert not unconstrained[0].text.startswith('{"questions":')


def test_local_constrained_reply_is_never_cut_by_max_tokens(tiny_model_dir):
    """max_tokens far below what the schema allows (3 tokens for up to 2 strings of 12 characters): the
    limit is raised to the schema's own bound, so even a model that never closes a string early parses."""
    from tunesmith.clients.chat import LocalChatClient
    from tunesmith.generation.constrained import bounded_schema, reply_token_bound

    doc = bounded_schema(Qs, max_items=2, max_chars=12)
    # {} + "questions" + ':' and ',' + [] + two items of (quotes + 12 characters of up to 6 bytes + ',')
    assert reply_token_bound(doc) == 2 + len('"questions"') + 2 + 2 + 2 * (2 + 6 * 12 + 1)
    assert reply_token_bound(bounded_schema(Qs)) is None  # an array with no maxItems: no bound
    requests = [ChatRequest.chat([{"role": "user", "content": f"q{i}"}], temperature=1.0, max_tokens=3, seed=i,
                                 schema=json.dumps(doc)) for i in range(4)]
    out = {}
    LocalChatClient(str(tiny_model_dir), batch_size=4).run(requests, out.__setitem__)
    for i in range(len(requests)):
        Qs.model_validate_json(out[i].text)
