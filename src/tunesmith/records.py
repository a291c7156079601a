"""The few record types every stage passes on."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Record:
    """One raw input row and where it came from (``source`` is ``file:line``)."""

    data: dict[str, Any]
    source: str


@dataclass
class Rejected:
    """A record some stage dropped, with the reason. Written to ``data/rejected.jsonl``."""

    source: str
    stage: str
    reason: str
    record: Any = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Example:
    """A task example: the fields the prompt is built from and the expected answer."""

    id: str
    inputs: dict[str, str]
    target: str
    meta: dict[str, Any] = field(default_factory=dict)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")



def parse_number(output: str | None) -> float | None:
    """The first number in the output ('₹1,299.00' → 1299.0); ``None`` if there is none.

    A non-numeric answer is counted as unparseable, never replaced by a default.
    """
    if not output:
        return None
    m = _NUMBER.search(output)
    if not m:
        return None
    try:
        return float(m.group().replace(",", ""))
    except ValueError:
        return None


def render_prompt(example: Example, template: str) -> str:
    """The prompt of an example: the template with its input fields filled in."""
    return template.format(**example.inputs)


def field_text(rec: Record, fields: list[str]) -> str:
    """The step's fields of a record joined by newlines (a missing or null field counts as empty)."""
    return "\n".join("" if rec.data.get(f) is None else str(rec.data[f]) for f in fields)
