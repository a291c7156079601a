"""JSON lines checked as a server reads a caller's file: UTF-8 throughout (its first bad byte named by line), and each
line one JSON value nested at most :data:`MAX_DEPTH` levels (a deeper one is refused, never a ``RecursionError``).
Used by the batch, evals and fine-tuning file checks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

MAX_DEPTH = 100  # levels of objects and arrays in one line: a 64-level schema fits inside a request's body


def utf8_problem(content: bytes) -> str | None:
    """Where ``content`` stops being UTF-8 (its line and byte), or None: a file is decoded strictly where it is
    used, so it is refused at upload rather than failing then."""
    try:
        content.decode("utf-8")
    except UnicodeDecodeError as err:
        line = content.count(b"\n", 0, err.start) + 1
        return (f"line {line}: not UTF-8 (byte 0x{content[err.start]:02x} at offset {err.start:,}); save the file "
                "as UTF-8")
    return None


class NotUTF8(ValueError):
    """A file's line that is not UTF-8 (``line``, from 1); the message names it and its byte, as
    :func:`utf8_problem` does."""

    def __init__(self, message: str, line: int):
        super().__init__(message)
        self.line = line


def utf8_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(number from 1, text) of each line of the file at ``path``, read a line at a time (a file of hundreds of MB is
    never held whole) and decoded strictly; :class:`NotUTF8` at the first line that is not UTF-8."""
    offset = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise NotUTF8(f"line {n}: not UTF-8 (byte 0x{raw[err.start]:02x} at offset {offset + err.start:,}); "
                              "save the file as UTF-8", n) from None
            offset += len(raw)


def json_line(line: str) -> tuple[object, str | None]:
    """One line's JSON value, or (None, why it is not one): not JSON, or nested deeper than :data:`MAX_DEPTH`."""
    try:
        value = json.loads(line)
    except ValueError:
        return None, "not JSON"
    except RecursionError:
        return None, f"nested deeper than {MAX_DEPTH} levels of objects and arrays"
    if nesting(value) > MAX_DEPTH:
        return None, f"nested deeper than {MAX_DEPTH} levels of objects and arrays"
    return value, None


def nesting(value: object, most: int = MAX_DEPTH) -> int:
    """How many levels of objects and arrays ``value`` nests (counted without recursion; stops past ``most``)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if deepest > most:
            break
        stack.extend((c, depth + 1) for c in children)
    return deepest
