"""Endpoint contenders and the judge against a dummy OpenAI-compatible server started in the test."""

import pytest

from tunesmith.clients.endpoint import EndpointClient
from tunesmith.config import EndpointSpec
from tunesmith.errors import ConfigError
from tunesmith.eval import judge

from .chat_server import serve


def scripted(content, n):
    if "ALWAYS429" in content:
        return 429, "slow down", 0
    if "FLAKY" in content:
        return (500, "oops", 0) if n == 0 else (200, "recovered", 0)
    if "SLOW" in content:
        return 200, "late", 1.0
    if "BADREQ" in content:
        return 400, "bad request", 0
    return 200, "echo: " + content, 0


def client(url, **kw):
    spec = EndpointSpec(
        name="e",
        base_url=url,
        model="m",
        api_key_env=None,
        timeout_s=0.4,
        max_retries=2,
        backoff_s=0.01,
        **kw,
    )
    sleeps = []
    return EndpointClient(spec, sleep=sleeps.append), sleeps


def msg(text):
    return [{"role": "user", "content": text}]


def test_retries_with_backoff_then_reports_per_example():
    with serve(scripted) as url:
        c, sleeps = client(url)
        replies = c.chat_many([msg("hello"), msg("FLAKY"), msg("ALWAYS429"), msg("BADREQ")], max_tokens=5)
    ok, flaky, limited, bad = replies
    assert (ok.text, ok.error, ok.attempts) == ("echo: hello", None, 1)
    assert (flaky.text, flaky.error, flaky.attempts) == ("recovered", None, 2)
    assert limited.text is None and limited.attempts == 3 and "HTTP 429" in limited.error
    assert bad.text is None and bad.attempts == 1 and "HTTP 400" in bad.error  # not worth retrying
    assert sorted(sleeps) == [0.01, 0.01, 0.02]  # flaky: one; 429: doubling backoff between 3 attempts


def test_timeout_is_retried_and_reported():
    with serve(scripted) as url:
        c, sleeps = client(url)
        r = c.chat(msg("SLOW"), max_tokens=5)
    assert r.text is None and r.attempts == 3 and "timeout: no reply within 0.4s" in r.error and sleeps == [0.01, 0.02]


def test_missing_api_key_is_a_config_error(monkeypatch):
    monkeypatch.delenv("TS_TEST_KEY", raising=False)
    spec = EndpointSpec(name="hosted", base_url="http://127.0.0.1:9/v1", model="m", api_key_env="TS_TEST_KEY")
    with pytest.raises(ConfigError, match="TS_TEST_KEY"):
        EndpointClient(spec)


def test_pairwise_judge_swaps_positions_so_position_bias_cancels():
    always_a = lambda content, n: (200, "A", 0)  # noqa: E731
    with serve(always_a) as url:
        c, _ = client(url)
        summary, verdicts = judge.pairwise(c, ["q1", "q2"], ["r", "r"], ["x1", "x2"], ["y1", "y2"])
    assert verdicts == ["tie", "tie"] and summary["win_rate"] == 0.5

    def prefers_good(content, n):  # picks whichever position holds the answer containing "good"
        a = content.split("Answer A:\n")[1].split("\n")[0]
        return 200, "A" if "good" in a else "B", 0

    with serve(prefers_good) as url:
        c, _ = client(url)
        summary, verdicts = judge.pairwise(
            c, ["q"] * 3, ["r"] * 3, ["good", "bad", "good"], ["bad", "good", "good"]
        )
    assert verdicts == ["win", "loss", "tie"]
    assert summary == {"n": 3, "wins": 1, "losses": 1, "ties": 1, "unjudged": 0, "win_rate": 0.5}


def test_judge_verdict_and_rubric_parsing():
    assert judge.parse_verdict(" b.") == "B" and judge.parse_verdict("Tie") == "tie"
    assert judge.parse_verdict("Both are fine") is None and judge.parse_verdict(None) is None
    assert judge.combine("A", None) is None
    with serve(lambda content, n: (200, "7" if "good" in content else "eleven", 0)) as url:
        c, _ = client(url)
        summary, scores = judge.rubric(c, "Rate it.", ["q", "q"], ["r", "r"], ["good", "bad"])
    assert scores == [7.0, None] and summary == {"n": 2, "unjudged": 1, "mean_score": 7.0}
