"""Each step's rows shared over tenants (tunesmith.serve.engines.shares) and the built-in engine pausing the rows past
a tenant's share, their KV cache kept, so that a light tenant's steps stay small while a flood waits, and every
paused row ends with exactly the answer it would have had."""

from __future__ import annotations

import asyncio

import pytest

from tunesmith.serve.engines.builtin import Engine
from tunesmith.serve.engines.interface import GenParams
from tunesmith.serve.engines.shares import Anticipation, Demand, ShareRules, Shares, water_fill


def test_water_fill_gives_each_what_it_wants_up_to_an_equal_share():
    assert water_fill({"a": 64, "b": 1}, 4) == {"a": 3, "b": 1}
    assert water_fill({"a": 64, "c": 64}, 64) == {"a": 32, "c": 32}
    assert water_fill({"a": 64, "b": 10, "c": 3}, 64) == {"a": 51, "b": 10, "c": 3}
    assert water_fill({"a": 5, "b": 5, "c": 5}, 2) in ({"a": 1, "b": 1, "c": 0}, {"a": 1, "b": 0, "c": 1},
                                                        {"a": 0, "b": 1, "c": 1})
    assert water_fill({"a": 0}, 4) == {"a": 0}


def test_a_light_tenant_shrinks_the_step_and_keeps_its_place_between_requests():
    now = [0.0]
    shares = Shares(ShareRules(max_rows=64, contended_rows=4, light_rows=2, grace_s=0.5), clock=lambda: now[0])
    alone = shares.quotas({"a": Demand(64)})
    assert alone["a"].interactive == 64  # one tenant alone fills the batch
    beside = shares.quotas({"a": Demand(64), "b": Demand(1)})
    assert (beside["a"].interactive, beside["b"].interactive) == (3, 1)
    now[0] += 0.2  # b between two requests: its place kept, the flood still small
    assert shares.quotas({"a": Demand(64)})["a"].interactive == 3
    now[0] += 0.6  # b gone for longer than the grace: the flood has the batch again
    assert shares.quotas({"a": Demand(64)})["a"].interactive == 64
    two_floods = shares.quotas({"a": Demand(64), "c": Demand(64)})
    assert (two_floods["a"].interactive, two_floods["c"].interactive) == (32, 32)  # none light: the whole batch


def test_the_shares_say_whether_a_light_tenant_runs_or_waits_between_requests():
    now = [0.0]
    shares = Shares(ShareRules(max_rows=64, contended_rows=4, light_rows=2, grace_s=0.5), clock=lambda: now[0])
    shares.quotas({"b": Demand(1)})
    assert (shares.light_running, shares.light_waiting) == (True, False)  # alone, running
    shares.quotas({"a": Demand(64), "b": Demand(1)})
    assert (shares.light_running, shares.light_waiting) == (True, False)
    now[0] += 0.2
    shares.quotas({"a": Demand(64)})
    assert (shares.light_running, shares.light_waiting) == (False, True)  # b between two requests
    now[0] += 0.6
    shares.quotas({"a": Demand(64)})
    assert (shares.light_running, shares.light_waiting) == (False, False)  # b gone
    shares.quotas({"a": Demand(64), "c": Demand(64)})
    assert (shares.light_running, shares.light_waiting) == (False, False)  # none light


def test_background_rows_come_after_every_interactive_row():
    shares = Shares(ShareRules(max_rows=8, contended_rows=4))
    q = shares.quotas({"a": Demand(0, 40), "b": Demand(1, 0)})
    assert (q["a"].background, q["b"].interactive) == (3, 1)
    q = Shares(ShareRules(max_rows=8, contended_rows=4)).quotas({"a": Demand(2, 40), "c": Demand(8, 0)})
    # none light: the whole batch, a's interactive rows and c's before a's batch lines
    assert q["a"].interactive == 2 and q["c"].interactive == 6 and q["a"].background == 0


def test_the_engine_pauses_a_flood_for_a_light_tenant_and_every_answer_is_unchanged(tiny_model_dir):
    engine = Engine(str(tiny_model_dir), {}, max_batch=16, wait_ms=1)  # on a CPU: 2 rows beside a light tenant
    most_beside: list[int] = []

    async def scenario(with_other: bool):
        ids = engine.text_prompt_ids("hello there")
        flood = [engine.submit(engine.base_name, ids + [i + 3], [GenParams(40)], tenant="flood") for i in range(24)]
        other_text = None
        if with_other:
            await asyncio.sleep(0.2)
            other = engine.submit(engine.base_name, ids, [GenParams(6)], tenant="other")
            watched = asyncio.ensure_future(other.results())
            while not watched.done():
                most_beside.append(len(engine.batch.active))
                await asyncio.sleep(0.002)
            other_text = (await watched)[0].text
        texts = [(await r.results())[0].text for r in flood]
        return texts, other_text

    try:
        plain, _ = asyncio.run(scenario(False))
        shared, other = asyncio.run(scenario(True))
    finally:
        engine.close()
    assert other is not None
    assert shared == plain  # paused and resumed rows end exactly as they would have
    # once the other tenant's row is in, the step holds at most 2 rows (its own and 1 of the flood's)
    assert most_beside and min(most_beside) <= 2 and most_beside[-1] <= 2, most_beside


def test_a_row_ending_at_its_first_token_is_answered_before_the_rows_in_flight_decode(tiny_model):
    """A step that prefills after a step that decoded ends there: a one-token answer is returned without a decoding
    step of the rows in flight; the next step decodes them, so two steps in a row never both skip it, and every
    row's tokens are what they are alone."""
    from tunesmith.generation import ContinuousBatch, Row

    model, tok = tiny_model
    ids = tok("my card has not arrived yet", add_special_tokens=False)["input_ids"]
    alone = Row(ids, GenParams(8, stop_token_ids=()))
    batch = ContinuousBatch(model, tok, max_rows=8)
    batch.add(alone)
    while batch.busy:
        batch.step()
    long = Row(ids, GenParams(8, stop_token_ids=()))
    batch.add(long)
    batch.step()
    assert len(long.generated) == 2  # nothing decoded before: its prefill and a decoding step
    batch.step()
    assert len(long.generated) == 3
    first = Row(ids, GenParams(1))
    batch.add(first)
    assert batch.step() == [first] and len(first.generated) == 1  # answered at its prefill
    assert len(long.generated) == 3  # not decoded in that step
    second, third = Row(ids, GenParams(1)), Row(ids, GenParams(1))
    batch.add(second)
    batch.step()
    assert len(long.generated) == 4  # a prefill after a step without decoding: it decodes too
    batch.add(third)
    assert batch.step() == [third] and len(long.generated) == 4
    while batch.busy:
        batch.step()
    assert long.generated == alone.generated and first.generated == second.generated == third.generated


def test_anticipation_waits_only_for_a_tenant_that_came_back_quickly_last_time():
    ahead = Anticipation(window_s=0.03)
    ahead.ended_all("quick", 10.0)
    assert ahead.wait_s(10.001) == 0  # never seen coming back: not waited for
    ahead.arrived("quick", 10.010)  # back in 10 ms
    ahead.ended_all("quick", 11.0)
    assert ahead.wait_s(11.01) == pytest.approx(0.02)  # waited for up to 30 ms after its end
    assert ahead.wait_s(11.05) == 0  # the window passed: the others' step starts
    ahead.arrived("quick", 11.2)  # back late this time
    ahead.ended_all("quick", 12.0)
    assert ahead.wait_s(12.0) == 0
    ahead.ended_all("slow", 13.0)
    ahead.arrived("slow", 13.5)
    ahead.ended_all("slow", 14.0)
    assert ahead.wait_s(14.0) == 0


def test_the_engine_waits_for_a_quick_tenants_next_request_before_the_others_next_step(tiny_model_dir):
    """A tenant sending one-token requests one after another, 20 ms apart, beside another's long request: once it has
    come back within the window, the engine waits for its next request instead of starting the other's next step, so
    its requests take about a step each, and no step of the other's runs in its 20 ms."""
    engine = Engine(str(tiny_model_dir), {}, max_batch=8, wait_ms=1)
    engine.anticipation.window_s = 1.0  # wide: the test's own loop is never late for it
    prompt = engine.text_prompt_ids("hello")

    async def run():
        long = engine.submit(engine.base_name, prompt, [GenParams(400, stop_token_ids=())], tenant="long")
        for _ in range(3):  # known quick after its first return
            await engine.submit(engine.base_name, prompt, [GenParams(1)], tenant="quick").results()
        before = sum(engine.steps_by_threads.values())
        for _ in range(6):
            await asyncio.sleep(0.02)  # its client's way back: without waiting for it, steps of the other's run here
            await engine.submit(engine.base_name, prompt, [GenParams(1)], tenant="quick").results()
        steps = sum(engine.steps_by_threads.values()) - before
        engine.anticipation.window_s = 0  # let the long request finish at full speed
        await long.results()
        return steps

    try:
        steps = asyncio.run(run())
        assert steps <= 6 + 1  # each quick request one step (without waiting: a step of the other's before each)
    finally:
        engine.close()
