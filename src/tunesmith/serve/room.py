"""A room of the server: the routes it serves, what it sets up when the app is made and what it runs while the app
lives. The app factory only lists rooms (:func:`tunesmith.serve.app.create_app`); each room's ``room.py`` says the
rest, so a new room (or a new kind of claimed work) is one module there and one line in the list."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fastapi import APIRouter, FastAPI

Stop = Callable[[], None]


@dataclass(frozen=True)
class Room:
    """``setup(app)``: at the app's making, in the order of the rooms (state, middlewares, handlers); ``routers``
    included then, in order; ``start(app)``: at the app's start, in the order of the rooms, returning what stops it,
    called at the end in the reverse order."""

    name: str
    routers: tuple[APIRouter, ...] = ()
    setup: Callable[[FastAPI], None] | None = None
    start: Callable[[FastAPI], Awaitable[Stop | None]] | None = None
    mounts: tuple[Callable[[FastAPI], None], ...] = field(default=())


def install(app: FastAPI, rooms: tuple[Room, ...]) -> None:
    """Each room set up and its routes included, in order."""
    for room in rooms:
        if room.setup is not None:
            room.setup(app)
        for router in room.routers:
            app.include_router(router)
        for mount in room.mounts:
            mount(app)


async def start(app: FastAPI, rooms: tuple[Room, ...]) -> list[Stop]:
    """Each room started in order; what stops them, in the order to call it (the reverse)."""
    stops: list[Stop] = []
    for room in rooms:
        if room.start is not None and (stop := await room.start(app)) is not None:
            stops.append(stop)
    return stops[::-1]
