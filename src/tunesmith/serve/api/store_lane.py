"""Store work off the event loop: a route's reads and writes of the store (SQLite, or PostgreSQL through psycopg) and
of the files it keeps run in the store lane (:mod:`tunesmith.serve.lanes`) as the caller's key's work, in its turn.
On the loop, one slow query (or a database that cannot be reached) would stall every key's requests, streams
included; in the lane it holds one of its threads, and a key holds at most its share of them.

A route whose body is only store and file work is a plain ``def`` decorated :func:`in_store_lane`; a route that must
``await`` something (an upload's body, another lane, the engine) stays ``async def`` and runs its store work through
:func:`stored`.
"""

from __future__ import annotations

import functools
import inspect

from fastapi import Request


def in_store_lane(route):
    """``route``, a plain ``def`` taking ``request`` and ``key`` (the owner id of ``auth.Key``), as the ``async def``
    FastAPI calls: its body runs in the store lane as ``key``'s work. FastAPI reads ``route``'s own parameters
    (through ``__wrapped__``), so its dependencies, path and query parameters and body models resolve as before."""
    params = inspect.signature(route).parameters
    if inspect.iscoroutinefunction(route) or not {"request", "key"} <= set(params):
        raise TypeError(f"{route.__qualname__}: in_store_lane takes a plain def with 'request' and 'key' parameters")

    @functools.wraps(route)
    async def in_lane(**values):  # FastAPI passes every parameter by name
        return await values["request"].app.state.lanes.store.run(values["key"], functools.partial(route, **values))

    return in_lane


async def stored(request: Request, key: str | None, fn, *args, always: bool = False):
    """``fn(*args)``, store or file work of ``key``'s request, in the store lane: a 429 when the key's line there is
    full, unless ``always`` (a step that must run, such as undoing what a failed request began)."""
    return await request.app.state.lanes.store.run(key, fn, *args, always=always)
