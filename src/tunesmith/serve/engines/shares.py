"""How many rows each tenant (API key) may decode in the next step: the engines' fair share, decided at every step.

A decoding step costs more the more rows it holds, and on a CPU much more: a quiet key's one row in a step beside a
flood's 64 took tens of times as long as alone. So the share is decided by the tenants present, not first come:

- one tenant alone fills the batch (``max_rows``): its throughput is the engine's;
- several, and one of them *light* (no more than :attr:`ShareRules.light_rows` rows wanted): the step holds at most
  :attr:`ShareRules.contended_rows` rows (never fewer than the tenants present), so the light tenant's steps stay
  close to what they cost alone, and the heavy ones share the rest;
- several, none light: the whole batch, shared.

Within that capacity the rows are given max-min fair (water filling): every tenant gets what it wants up to an equal
share, and what the small ones leave goes to the others. A tenant's interactive rows come before its background rows
(a batch's lines), and every tenant's interactive rows before anyone's background rows. A tenant stays *present* for
:attr:`ShareRules.grace_s` after its last row ended, with one row kept for it, so that a client sending one request
after another does not meet a full batch each time it comes back. The engines pause (or hold back) the rows past a
tenant's share and resume them when it grows again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

CPU_CONTENDED_ROWS = 2  # one row a tenant; measured: docs/benchmarks.md, "Noisy neighbours at default settings"
CPU_ANTICIPATE_S = 0.03  # a client's next request after its last answer, on the same host: 7-13 ms (docs/benchmarks.md)


@dataclass(frozen=True)
class ShareRules:
    max_rows: int  # the engine's batch
    contended_rows: int  # the step's rows while a light tenant is present (at least one per tenant)
    light_rows: int = 2  # a tenant wanting at most this many rows is light
    grace_s: float = 0.5  # a tenant stays present this long after its last row ended


@dataclass
class Demand:
    interactive: int = 0
    background: int = 0

    @property
    def total(self) -> int:
        return self.interactive + self.background


@dataclass
class Shares:
    """The tenants' shares over time: :meth:`quotas` once per step with what each tenant wants now."""

    rules: ShareRules
    clock: object = time.monotonic
    last_seen: dict = field(default_factory=dict)  # tenant -> when it last had a row
    # after the last quotas: a light tenant (a key waiting on a few rows of its own) has rows in the step; one is
    # present with none (between two of its requests, its next soon to come)
    light_running: bool = False
    light_waiting: bool = False

    def quotas(self, demand: dict[object, Demand]) -> dict[object, Demand]:
        """Rows each tenant may decode in the next step, interactive and background apart."""
        now = self.clock()
        for tenant, d in demand.items():
            if d.total:
                self.last_seen[tenant] = now
        for tenant, seen in list(self.last_seen.items()):
            if now - seen > self.rules.grace_s:
                del self.last_seen[tenant]
        wanted = {t: Demand(d.interactive, d.background) for t, d in demand.items() if d.total}
        for tenant in self.last_seen:  # present but between requests: one row kept for it
            wanted.setdefault(tenant, Demand(1, 0))
        light = [t for t, d in wanted.items() if d.total <= self.rules.light_rows]
        self.light_running = any(demand.get(t, Demand()).total for t in light)
        self.light_waiting = len(wanted) > 1 and any(not demand.get(t, Demand()).total for t in light)
        capacity = self.capacity(wanted)
        first = water_fill({t: d.interactive for t, d in wanted.items()}, capacity)
        left = capacity - sum(first.values())
        then = water_fill({t: d.background for t, d in wanted.items()}, left)
        return {t: Demand(first.get(t, 0), then.get(t, 0)) for t in demand}

    def capacity(self, wanted: dict[object, Demand]) -> int:
        rules = self.rules
        if len(wanted) <= 1 or min(d.total for d in wanted.values()) > rules.light_rows:
            return rules.max_rows
        return min(rules.max_rows, max(rules.contended_rows, len(wanted)))


def water_fill(wanted: dict[object, int], capacity: int) -> dict[object, int]:
    """Max-min fair shares of ``capacity``: each gets what it wants up to an equal share, the rest goes round again."""
    given = dict.fromkeys(wanted, 0)
    left = max(0, capacity)
    open_ = sorted((t for t, n in wanted.items() if n > 0), key=lambda t: wanted[t])
    while open_ and left > 0:
        share = max(1, left // len(open_))
        for t in list(open_):
            take = min(share, wanted[t] - given[t], left)
            given[t] += take
            left -= take
            if given[t] >= wanted[t]:
                open_.remove(t)
            if left == 0:
                break
    return given


def default_contended_rows(device) -> int:
    """The step's rows while a light tenant shares the engine: on a CPU a step's cost grows with its rows
    (docs/benchmarks.md, "Noisy neighbours"), so few; on an accelerator, where a few more rows cost next to
    nothing, no cap."""
    return CPU_CONTENDED_ROWS if _on_cpu(device) else 1 << 30


def default_anticipate_s(device) -> float:
    """How long the engine waits for a quick tenant's next request (:class:`Anticipation`): on a CPU, where one
    decoding step of a single row takes 0.06-0.1 s, :data:`CPU_ANTICIPATE_S`; on an accelerator, where a step is
    shorter than a client's way back, not at all."""
    return CPU_ANTICIPATE_S if _on_cpu(device) else 0.0


def _on_cpu(device) -> bool:
    """Whether ``device`` (a torch device or its name) is the CPU."""
    return getattr(device, "type", str(device)) == "cpu"


@dataclass
class Anticipation:
    """Anticipatory scheduling for tenants that send one request after another. When a tenant's last row ends while
    other tenants' rows are in flight, the engine would start their next step at once, and the tenant's next
    request, arriving a few milliseconds later, would wait for that whole step (beside a 64-row sample, a quiet key's
    0.13 s Tinker sample took 1.9x). So a tenant that came back within ``window_s`` the last time is waited for, up
    to ``window_s`` after its last row ended, before that step starts; one that came back later, or not yet, is not
    waited for, so a slow client costs the others nothing."""

    window_s: float
    ended: dict = field(default_factory=dict)  # tenant -> when its last row ended (none of its rows left)
    quick: set = field(default_factory=set)  # tenants that came back within the window last time
    forget_s: float = 60.0  # an end this old is forgotten, with the tenant's quickness

    def ended_all(self, tenant, now: float) -> None:
        self.ended[tenant] = now

    def arrived(self, tenant, now: float) -> None:
        """A row of ``tenant`` arrived: how soon it came back after its last one ended."""
        ended = self.ended.pop(tenant, None)
        if ended is not None and now - ended <= self.window_s:
            self.quick.add(tenant)
        elif ended is not None:
            self.quick.discard(tenant)

    def wait_s(self, now: float) -> float:
        """How long the next step may still wait for a quick tenant's next request (0: start it now)."""
        for tenant, ended in list(self.ended.items()):
            if now - ended > self.forget_s:
                del self.ended[tenant]
                self.quick.discard(tenant)
        return max([0.0, *(self.window_s - (now - t) for tenant, t in self.ended.items() if tenant in self.quick)])
