"""The few record types every stage passes on."""

from __future__ import annotations

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
