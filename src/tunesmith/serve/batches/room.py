"""The Batch API's room: its routes, and the runner that answers every replica's batches chunk by chunk."""

from __future__ import annotations

from fastapi import FastAPI

from tunesmith.serve.batches import routes
from tunesmith.serve.batches.runner import BatchRunner
from tunesmith.serve.room import Room, Stop


def setup(app: FastAPI) -> None:
    settings = app.state.settings
    app.state.batch_runner = BatchRunner(app, settings.batch_lines_in_flight, settings.batch_chunk_lines)


async def start(app: FastAPI) -> Stop:
    app.state.batch_runner.start()
    return app.state.batch_runner.stop


ROOM = Room("batches", routers=(routes.router,), setup=setup, start=start)
