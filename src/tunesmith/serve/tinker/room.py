"""The Tinker room: the Tinker API (``/api/v1/...``) on the served base, its state made at the app's start."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tunesmith.serve.room import Room, Stop
from tunesmith.serve.tinker import routes
from tunesmith.serve.tinker.losses import TrainingError
from tunesmith.serve.tinker.wire import WireError


def setup(app: FastAPI) -> None:
    """A call the Tinker API cannot run as asked, refused outside a future (a path, a sampler's checkpoint): a 400
    naming what is wrong, as inside a future it is the protocol's ``user`` error."""

    @app.exception_handler(TrainingError)
    @app.exception_handler(WireError)
    async def _refused(request: Request, exc: Exception):
        return JSONResponse({"error": {"message": str(exc), "type": "invalid_request_error", "param": None,
                                       "code": "invalid_value"}}, status_code=400)


async def start(app: FastAPI) -> Stop:
    """The room's state; its runs' claims are let go at the stop (their rows free for a client's reload)."""
    from tunesmith.serve.tinker.service import Tinker

    app.state.tinker = tinker = Tinker(app)
    tinker.start()
    return tinker.close


ROOM = Room("tinker", routers=(routes.router,), setup=setup, start=start)
