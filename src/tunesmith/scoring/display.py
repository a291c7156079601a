"""How a score is written in tables and charts: percentages, plain numbers, signed differences."""

from __future__ import annotations


def pct(v) -> str:
    return "–" if v is None else f"{v:.1%}"



def num(v, fmt: str = "{:.3f}") -> str:
    return "–" if v is None else fmt.format(v)



def signed(v: float) -> str:
    """A difference with its sign: whole numbers from 100 up (+1,140, not +1.14e+03), else 3 digits."""
    return f"{v:+,.0f}" if abs(v) >= 100 else f"{v:+.3g}"
