"""The Evals room: evals, runs and graders, and the runs a stopped server or a dead replica left, run again."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI

from tunesmith.serve.evals import resume, routes, routes_graders
from tunesmith.serve.room import Room, Stop


async def start(app: FastAPI) -> Stop:
    """Eval runs a stopped server left (on SQLite, the only server: all of them) run again from their rows, and every
    third of a lease those a dead replica left."""
    await resume.resume_abandoned(app, everyone=app.state.store.db.kind == "sqlite")
    watcher = asyncio.ensure_future(resume.watch(app))
    return watcher.cancel


ROOM = Room("evals", routers=(routes_graders.router, routes.router), start=start)
