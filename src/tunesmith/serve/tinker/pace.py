"""What one Tinker call may cost before it runs: its time, from this server's recent pace (:class:`Pace`)."""

from __future__ import annotations

from tunesmith.serve.tinker.losses import TrainingError


class Pace:
    """What a token of each kind of call (``forward_backward``: a sample's rows are the engine's, bounded as a chat
    request's) has cost here lately, in seconds (a moving
    average of the calls run): a call's time is estimated from it before the call runs. Only calls of at least
    :attr:`MEASURED` tokens are counted: a small call's time is mostly its fixed cost, which says nothing of a long
    one's."""

    MEASURED = 1024

    def __init__(self):
        self.per_token: dict[str, float] = {}

    def record(self, kind: str, seconds: float, tokens: int) -> None:
        if tokens >= self.MEASURED and seconds > 0:
            last = self.per_token.get(kind)
            now = seconds / tokens
            self.per_token[kind] = now if last is None else 0.7 * last + 0.3 * now

    def check(self, kind: str, tokens: int, limit: float, what: str) -> None:
        """A TrainingError when ``tokens`` of ``kind`` would take past ``limit`` seconds at the recent pace."""
        per = self.per_token.get(kind)
        if per is not None and tokens * per > limit:
            raise TrainingError(f"{what}: {tokens:,} tokens would take about {tokens * per:,.0f} s at this server's "
                                f"recent pace ({1 / per:,.3g} tokens/s), past the {limit:.0f} s one call may hold the "
                                "base for every key's calls (--request-timeout); split it into smaller calls")
