"""The Tinker API's futures in their lane: who may take a turn inside a fused step (the calls are plain functions here:
the seam is what a turn runs, not how)."""

from __future__ import annotations

import asyncio
import threading


def test_a_keys_next_call_never_runs_inside_the_fused_step_that_holds_its_call():
    """Key A's and key B's forward_backward calls run as one step. B's optim_step, sent right behind its
    forward_backward, does not take a turn between the step's layers: it would step B's weights in the middle of the
    pass that computes their gradients. Key C's call does take that turn, and B's optim_step runs after the step."""
    from tunesmith.serve.lanes import Lane, LaneSize
    from tunesmith.serve.tinker.futures import Fusing, Futures

    events: list[tuple] = []
    gate = threading.Event()

    async def main():
        futures: Futures | None = None

        def fused(items):
            events.append(("step", tuple(sorted(owner for owner, in items))))
            futures.others_turn()  # a turn point between two of the step's layers
            events.append(("step ends",))
            return [f"fb {owner}" for owner, in items]

        def fb(owner):
            events.append(("fb", owner))
            return f"fb {owner}"

        def optim(owner):
            events.append(("optim", owner))
            return "optim"

        futures = Futures(Lane("tinker", LaneSize(1, 1, 16), "test"), fuse={"fb": Fusing(fused, lambda args: 1, 10)})
        futures.submit("z", "hold", lambda: gate.wait(10))  # the lane held: the calls below queue behind it
        futures.submit("a", "fb", fb, "a", fusable=True)
        futures.submit("b", "fb", fb, "b", fusable=True)
        futures.submit("b", "optim", optim, "b")
        futures.submit("c", "optim", optim, "c")
        gate.set()
        await asyncio.wait_for(asyncio.gather(*(p.done.wait() for p in futures.items.values())), 30)
        return {p.owner + " " + p.kind: p.answer for p in futures.items.values()}

    answers = asyncio.run(main())
    assert events[0] == ("step", ("a", "b")), events
    assert events.index(("optim", "c")) < events.index(("step ends",)) < events.index(("optim", "b")), events
    assert answers["a fb"] == "fb a" and answers["b fb"] == "fb b" and answers["b optim"] == "optim"
