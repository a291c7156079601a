"""The Tinker room: the Tinker API (``/api/v1/...``) on the served base, its state made at the app's start."""

from __future__ import annotations

from fastapi import FastAPI

from tunesmith.serve.room import Room, Stop
from tunesmith.serve.tinker import routes


async def start(app: FastAPI) -> Stop:
    """The room's state; its runs' claims are let go at the stop (their rows free for a client's reload)."""
    from tunesmith.serve.tinker.service import Tinker

    app.state.tinker = tinker = Tinker(app)
    return tinker.close


ROOM = Room("tinker", routers=(routes.router,), start=start)
