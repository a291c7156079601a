"""The fair share on the vLLM engine (tunesmith.serve.engines.vllm.sharing): vLLM is sent at most each tenant's share
of rows, and a flood's rows past a share that shrank are paused by recompute, each answer the one it would have had.

All but the last test run the real engine over a stand-in vLLM server (tests/fake_vllm, a word a token every 50 ms,
going on from the words that end a prompt as a greedy model does) and read what that server was sent; the last runs
vLLM's CPU build (`make test-vllm`)."""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import threading
import time

import httpx2 as httpx
import pytest

from tunesmith.serve.engines.interface import Delta, GenParams
from tunesmith.serve.engines.shares import ShareRules, Shares
from tunesmith.serve.engines.vllm.sharing import (
    LINE,
    PAUSED,
    RUNNING,
    Row,
    ends_mid_character,
    may_pause,
    plan,
    within_prefill,
)

from .conftest import REPO, vllm_engine, vllm_or_skip

FAKE = REPO / "tests" / "fake_vllm"
WORDS = "one two three four five six seven eight nine ten".split()
MAX_ROWS = 8


def words(n: int) -> str:
    return " ".join((WORDS * 10)[:n])


class Loop:
    """An event loop in a thread, as the server's: requests are submitted and read there while the test watches."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def ask(self, engine, tenant: str, prompt: list[int], params: GenParams, stream: bool = False, constraint=None,
            background: bool = False):
        """A future of (the text streamed, the Generation) of one choice."""
        async def run():
            request = engine.submit(engine.base_name, prompt, [params], stream=stream, constraint=constraint,
                                    tenant=tenant, background=background)
            streamed = []
            async for _, item in request.events():
                if isinstance(item, Delta):
                    streamed.append(item.text)
                else:
                    return "".join(streamed), item

        return asyncio.run_coroutine_threadsafe(run(), self.loop)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def fake(tiny_model_dir, tmp_path_factory):
    """The vLLM engine over the stand-in vLLM: a batch of 8 rows, 4 while a light tenant is present, and 4 prompt
    tokens (two prompts of these tests) per tenant waiting for their first token."""
    from tunesmith.serve.engines.vllm.engine import VllmEngine

    tmp = tmp_path_factory.mktemp("fake-vllm-sharing")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(FAKE), os.environ.get("PYTHONPATH", "")]))
        engine = VllmEngine(str(tiny_model_dir), {}, tmp / "log", python=sys.executable, request_timeout_s=60,
                            start_timeout_s=120, max_rows=MAX_ROWS, contended_rows=4, prefill_tokens=4)
    fake = Fake(engine)
    try:
        yield fake
    finally:
        fake.close()
        engine.close()


class Fake:
    """The engine, an event loop to submit on, and what the stand-in vLLM was sent."""

    def __init__(self, engine):
        self.engine, self.loop = engine, Loop()
        self.client = httpx.Client(transport=httpx.HTTPTransport(uds=engine.server.socket_path), timeout=10)

    def sent(self) -> dict:
        """The stand-in vLLM's open streams (each one's first two prompt ids), the streams their client closed
        before their end, and the requests it was sent."""
        return self.client.get("http://vllm/fake/state", headers=self.engine.server.headers).json()

    def open_of(self, *tags: int) -> tuple[int, ...] | int:
        """Open streams whose prompt starts with each tag."""
        heads = [h[0] for h in self.sent()["open"]]
        counts = tuple(heads.count(t) for t in tags)
        return counts[0] if len(tags) == 1 else counts

    def ask(self, *args, **kw):
        return self.loop.ask(self.engine, *args, **kw)

    def close(self):
        self.client.close()
        self.loop.close()


def wait_for(condition, timeout: float = 5.0, every: float = 0.02) -> float:
    """Seconds until ``condition()`` held (fails past ``timeout``)."""
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < timeout, "not reached in time"
        time.sleep(every)
    return time.monotonic() - t0


def test_one_tenant_alone_fills_the_batch_and_the_rest_waits_its_turn(fake):
    engine = fake.engine
    before = fake.sent()
    futures = [fake.ask("a", [11, i], GenParams(10)) for i in range(12)]
    most = 0
    while not all(f.done() for f in futures):
        most = max(most, fake.open_of(11))
        time.sleep(0.02)
    assert most == MAX_ROWS  # the batch full, never more: the 4 others waited at our side
    answers = [f.result()[1] for f in futures]
    assert {(a.text, a.prompt_tokens, a.completion_tokens) for a in answers} == {(words(10), 2, 10)}
    after = fake.sent()
    assert after["sent"] - before["sent"] == 12 and after["closed_early"] == before["closed_early"]
    assert engine.in_flight() == 0


def test_a_light_tenant_is_sent_at_once_and_the_flood_paused_to_the_contended_rows(fake):
    """a has 8 rows in vLLM and 4 in its line; b's one row goes to vLLM at once, and a's are paused down to 3 (4
    rows while b is present); once b is gone a has the batch again, and every one of a's answers, streamed or not,
    is the one it would have had unpaused, with its usage."""
    engine = fake.engine
    before, pauses = fake.sent(), engine.pauses
    flood = [fake.ask("a", [21, i], GenParams(60), stream=i % 2 == 1) for i in range(MAX_ROWS + 4)]
    wait_for(lambda: fake.open_of(21) == MAX_ROWS)
    time.sleep(0.3)  # a few words generated in every row
    light = fake.ask("b", [22, 0], GenParams(6))
    assert wait_for(lambda: fake.open_of(22) == 1) < 1.0  # not behind a's line: a's first rows end after 3 s
    wait_for(lambda: fake.open_of(21) == 3, timeout=2.0)
    streamed, answer = light.result(10)
    assert (answer.text, answer.prompt_tokens, answer.completion_tokens) == (words(6), 2, 6)
    wait_for(lambda: fake.open_of(21) == MAX_ROWS, timeout=3.0)  # b's grace over: a's paused rows resumed
    for i, future in enumerate(flood):
        streamed, answer = future.result(30)
        assert (answer.text, answer.prompt_tokens, answer.completion_tokens, answer.finish_reason) == \
            (words(60), 2, 60, "length")
        assert streamed == (answer.text if i % 2 == 1 else "")  # one stream, no word lost or repeated
    assert engine.pauses - pauses >= 5 and fake.sent()["closed_early"] - before["closed_early"] >= 5
    assert engine.in_flight() == 0 and not engine.rows


def test_background_rows_are_paused_before_their_tenants_interactive_rows(fake):
    rows = [fake.ask("a", [31, i], GenParams(60)) for i in range(4)]
    rows += [fake.ask("a", [32, i], GenParams(60), background=True) for i in range(4)]
    wait_for(lambda: fake.open_of(31, 32) == (4, 4))
    light = fake.ask("b", [33, 0], GenParams(6))
    wait_for(lambda: fake.open_of(31, 32, 33) == (3, 0, 1), timeout=2.0)
    light.result(10)
    assert {f.result(30)[1].text for f in rows} == {words(60)}


UNPAUSABLE = [GenParams(60), GenParams(60, stop=("zz",)), GenParams(60, frequency_penalty=0.5),
              GenParams(60, presence_penalty=0.5), GenParams(60, temperature=0.7, seed=7)]  # the first: constrained


def test_rows_that_cannot_go_on_exactly_and_whose_text_is_read_are_never_paused(fake):
    """Under a constraint, with a stop string, a penalty or seeded sampling, a row whose caller already reads its
    text keeps running past its share (its answer could differ if it went on from a pause, and it cannot start
    again); the light tenant is still sent at once."""
    engine = fake.engine
    constraint = engine.json_constraint({"type": "object"})
    before, pauses = fake.sent(), engine.pauses
    kept = [fake.ask("a", [41, i], params, stream=True, constraint=constraint if i == 0 else None)  # streams: open
            for i, params in enumerate(UNPAUSABLE)]
    wait_for(lambda: fake.open_of(41) == 5)
    wait_for(lambda: all(r.text for r in list(engine.rows) if r.tenant == "a"))  # the callers read their text
    light = fake.ask("b", [42, 0], GenParams(4))
    assert wait_for(lambda: fake.open_of(42) == 1) < 1.0
    time.sleep(0.5)
    assert fake.open_of(41) == 5
    light.result(10)
    assert all(f.result(30)[1].completion_tokens == 60 for f in kept)
    assert engine.pauses == pauses and fake.sent()["closed_early"] == before["closed_early"]


def test_rows_that_cannot_go_on_exactly_start_again_while_their_caller_has_seen_nothing(fake):
    """The same rows, not streamed: past their tenant's share they are closed and sent again whole, and end with the
    answer they have alone (greedy, or seeded)."""
    engine = fake.engine
    constraint = engine.json_constraint({"type": "object"})
    alone = [fake.ask("c", [43, i], p, constraint=constraint if i == 0 else None).result(30)[1].text
             for i, p in enumerate(UNPAUSABLE)]
    before, pauses = fake.sent(), engine.pauses
    rows = [fake.ask("c", [43, i], p, constraint=constraint if i == 0 else None) for i, p in enumerate(UNPAUSABLE)]
    wait_for(lambda: fake.open_of(43) == 5)
    wait_for(lambda: all(r.generated for r in list(engine.rows) if r.tenant == "c"))
    light = fake.ask("d", [44, 0], GenParams(4))
    assert wait_for(lambda: fake.open_of(44) == 1) < 1.0
    wait_for(lambda: fake.open_of(43) <= 3)  # the contended 4: the light row and 3 of the flood's
    light.result(10)
    assert [f.result(30)[1].text for f in rows] == alone
    assert all(f.result(30)[1].completion_tokens == 60 for f in rows)
    assert engine.pauses >= pauses + 2 and fake.sent()["closed_early"] >= before["closed_early"] + 2


def test_a_request_cancelled_in_its_tenants_line_is_never_sent(fake):
    engine = fake.engine
    flood = [fake.ask("a", [51, i], GenParams(20)) for i in range(MAX_ROWS)]
    wait_for(lambda: fake.open_of(51) == MAX_ROWS)
    before = fake.sent()["sent"]

    async def submit_and_cancel():
        request = engine.submit(engine.base_name, [52, 0], [GenParams(10)], tenant="a")
        request.cancel()

    asyncio.run_coroutine_threadsafe(submit_and_cancel(), fake.loop.loop).result(5)
    for f in flood:
        f.result(10)
    time.sleep(0.1)
    assert fake.sent()["sent"] == before and not engine.rows


def test_a_tenants_prompts_go_to_vllm_a_prefills_worth_at_a_time(fake):
    """A burst of 8 new prompts is sent as the earlier ones get their first token (here two at a time), so that no
    step of vLLM's prefills them all at once while another tenant's row waits for it."""
    futures = [fake.ask("a", [61, i], GenParams(10)) for i in range(MAX_ROWS)]
    assert {f.result(30)[1].text for f in futures} == {words(10)}
    assert fake.sent()["most_unprefilled"]["61"] == 2


def test_which_rows_may_be_paused():
    assert may_pause(GenParams(8), constrained=False)
    assert may_pause(GenParams(8, seed=3), constrained=False)  # greedy: the seed changes nothing
    assert may_pause(GenParams(8, temperature=0.8), constrained=False)  # unseeded: the same distribution
    assert may_pause(GenParams(8, logit_bias=((5, 2.0),)), constrained=False)  # the same bias at every step
    assert not may_pause(GenParams(8), constrained=True)
    assert not may_pause(GenParams(8, stop=("\n",)), constrained=False)
    assert not may_pause(GenParams(8, frequency_penalty=0.1), constrained=False)
    assert not may_pause(GenParams(8, presence_penalty=0.1), constrained=False)
    assert not may_pause(GenParams(8, temperature=0.8, seed=3), constrained=False)


def test_a_row_is_paused_only_at_a_characters_end(tiny_model):
    _, tokenizer = tiny_model
    ids = tokenizer("card 🙂", add_special_tokens=False)["input_ids"]
    assert len(ids) > 3  # the emoji is several byte tokens in this vocabulary
    assert not ends_mid_character(tokenizer, ids) and not ends_mid_character(tokenizer, [])
    assert ends_mid_character(tokenizer, ids[:-1])


def test_a_prefill_budget_per_tenant_and_one_long_prompt_alone():
    def row(tenant, n):
        return Row(request=None, index=0, body={"prompt": [0] * n}, model_id="m", params=GenParams(), tenant=tenant)

    a1, a2, a3, b1, long = row("a", 100), row("a", 100), row("a", 60), row("b", 100), row("c", 900)
    assert within_prefill([a1, a2, a3, b1, long], {}, 256) == [a1, a2, b1, long]  # a's third waits its turn, in order
    assert within_prefill([a1, b1], {"a": 200}, 256) == [b1]
    resumed = row("a", 100)
    resumed.generated = [1] * 200  # prefilled again with what it generated
    assert within_prefill([resumed, a3], {}, 256) == [resumed]


def test_the_plan_keeps_rows_that_may_not_be_paused_and_the_oldest_others():
    def row(tenant, state, pausable=True):
        return Row(request=None, index=0, body={}, model_id="m", params=GenParams(), tenant=tenant, state=state,
                   pausable=pausable)

    fixed = [row("a", RUNNING, pausable=False) for _ in range(2)]
    running = [row("a", RUNNING) for _ in range(3)]
    waiting = [row("a", PAUSED), row("a", LINE)]
    light = row("b", LINE)
    start, pause = plan([*fixed, *running, *waiting, light], Shares(ShareRules(max_rows=8, contended_rows=4)))
    assert start == [light] and pause == running[1:]  # a's share is 3: its 2 fixed rows and its oldest other
    running[2].pause_asked = True  # b gone: a's share is the batch again, a pause asked before is withdrawn
    start, pause = plan([*fixed, *running, *waiting], Shares(ShareRules(max_rows=8, contended_rows=4)))
    assert start == waiting and pause == [] and not running[2].pause_asked


# --- vLLM's CPU build ----------------------------------------------------------------------------------------------

FLOOD_PROMPT = "Write a long story about a {} who finds a map."
ANIMALS = ["fox", "cat", "owl", "bear", "wolf", "duck", "frog", "hare"]


@pytest.mark.vllm
@pytest.mark.slow
def test_on_vllm_a_quiet_tenant_beside_a_flood_of_24_and_every_flood_answer_as_without_it(tmp_path):
    """The flood's 24 greedy rows alone, then again with the quiet tenant's short request sent once they run: the
    quiet request ends within 2.5x its time alone (+0.3 s), rows were paused, and every flood answer is the same."""
    vllm_or_skip()
    with vllm_engine(tmp_path / "vllm") as engine:
        loop = Loop()
        try:
            chat = [engine.chat_prompt_ids([{"role": "user", "content": FLOOD_PROMPT.format(ANIMALS[i % 8]) +
                                             f" Chapter {i}."}]) for i in range(24)]
            quiet = engine.chat_prompt_ids([{"role": "user", "content": "What is the capital of France?"}])

            def flood():
                return [loop.ask(engine, "flood", ids, GenParams(48), stream=i % 3 == 0) for i, ids in enumerate(chat)]

            def quiet_once() -> float:
                t0 = time.monotonic()
                loop.ask(engine, "quiet", quiet, GenParams(8)).result(120)
                return time.monotonic() - t0

            quiet_once()  # warm
            alone = statistics.median(quiet_once() for _ in range(3))
            time.sleep(1)  # the quiet tenant's grace over: the flood alone
            unpaused = [f.result(300)[1].text for f in flood()]
            time.sleep(1)  # the quiet tenant's grace over
            pauses, rows = engine.pauses, flood()
            # every flood row sent (in vLLM, or already ended) with more than the contended share still in vLLM: on a
            # slower machine vLLM prefills the later rows (the prefill budget sends them as first tokens come back)
            # while the first ones finish, so all 24 at once is not guaranteed
            wait_for(lambda: 3 <= engine.in_flight_of.get("flood", 0) == 24 - sum(f.done() for f in rows), timeout=120)
            time.sleep(0.5)  # a few tokens into every row
            beside = quiet_once()
            answers = [f.result(300) for f in rows]
        finally:
            loop.close()
    assert engine.pauses > pauses
    assert beside < 2.5 * alone + 0.3, (beside, alone)
    assert [a.text for _, a in answers] == unpaused
    assert all(streamed == a.text for i, (streamed, a) in enumerate(answers) if i % 3 == 0)
