"""What a caller's value must be to reach the store, checked where a request enters, before anything is written.

Both backends refuse some values a JSON body can carry: PostgreSQL's TEXT cannot hold a NUL character (``\\u0000``),
no text encoding holds a lone UTF-16 surrogate (``\\ud800``: SQLite's driver and psycopg both fail on it), and an
INTEGER column holds signed 64 bits. Each is a 400 here naming the field (``metadata.k``, ``messages[0].content``,
``custom_id``), never the driver's error after a file's bytes were written.

NUL is refused everywhere except in text a model or a grader reads (a conversation, a prompt, an eval's rows, a
grader's reference): those fields reach the store only inside JSON, whose ``\\u0000`` escape any TEXT column holds,
and a model may be asked about the character. Names, ids, metadata, filters, suffixes and ``custom_id`` s are kept in
columns of their own, compared in SQL, and never hold one. A number is checked by the field that takes it (a seed's
range is its engine's or its trainer's: :func:`check_seed`).
"""

from __future__ import annotations

import re

from tunesmith.serve.errors import APIError

_SURROGATE = re.compile("[\ud800-\udfff]")


def check_value(value, param: str = "", free_text: tuple[str, ...] = (), nul_ok: bool = False) -> None:
    """400 on the first string in ``value`` (a parsed JSON value: its strings and its objects' keys) that the store
    cannot hold, named from ``param`` (``a.b[0].c``). NUL is accepted under the places ``free_text`` names
    (``messages``: that field and everything inside it), or everywhere with ``nul_ok``."""
    stack = [(value, param)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, str):
            _check_text(node, where, nul_ok or _inside(where, free_text))
        elif isinstance(node, dict):
            for k in node:
                _check_text(k, where, nul_ok or _inside(where, free_text), f" in the key '{_printable(k)}'")
            stack += [(v, f"{where}.{k}" if where else k) for k, v in reversed(node.items())]
        elif isinstance(node, list):
            stack += [(v, f"{where}[{i}]") for i, v in reversed(list(enumerate(node)))]


def check_name(text, param: str, most: int) -> str:
    """A name a caller gives (a file's, an eval's, a suffix): a string of 1 to ``most`` characters the store holds;
    a 400 naming ``param`` otherwise."""
    if not isinstance(text, str) or not text:
        raise APIError(400, f"{param} must be a non-empty string", param=param, code="invalid_value")
    if len(text) > most:
        raise APIError(400, f"{param} is {len(text):,} characters long; at most {most:,}. Send a shorter one",
                       param=param, code="string_above_max_length")
    _check_text(text, param, nul_ok=False)
    return text


def _inside(where: str, places: tuple[str, ...]) -> bool:
    return any(where == p or where.startswith((p + ".", p + "[")) for p in places)


def _check_text(text: str, where: str, nul_ok: bool, what: str = "") -> None:
    if found := _SURROGATE.search(text):
        raise APIError(400, f"{where or 'the body'} holds a lone UTF-16 surrogate{what} (\\u{ord(found.group()):04x} "
                       f"at character {found.start()}), which is not text; send the pair it belongs to, or valid "
                       "UTF-8", param=where or None, code="invalid_value")
    if not nul_ok and (at := text.find("\x00")) >= 0:
        raise APIError(400, f"{where or 'the body'} holds a NUL character{what} (\\u0000 at character {at}), which "
                       "no name, id or metadata may hold; remove it", param=where or None, code="invalid_value")


def _printable(text: str) -> str:
    """``text`` with lone surrogates and NUL written as their escapes, so that a message can quote it."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text).replace("\x00", "\\u0000")


def check_seed(seed, param: str = "seed", most: int = 2**63 - 1) -> None:
    """A seed from 0 to ``most`` (what its engine or trainer takes, within a 64-bit INTEGER); a 400 on ``param``."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= most):
        raise APIError(400, f"{param} must be a whole number from 0 to {most}, got {seed!r}", param=param,
                       code="invalid_value")
