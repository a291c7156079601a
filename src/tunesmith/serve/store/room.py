"""The store room: the store opened (SQLite in the data folder, or PostgreSQL), the data folder's secret checked
against the database's fingerprint, this replica's name among the holders of claims, and the sweep of what expired."""

from __future__ import annotations

from fastapi import FastAPI

from tunesmith.serve.room import Room, Stop
from tunesmith.serve.store import Store, worker_id
from tunesmith.serve.store.keys import checked_secret
from tunesmith.serve.store.quotas import start_sweeper


def setup(app: FastAPI) -> None:
    settings = app.state.settings
    app.state.store = Store(settings.data_dir, settings.database)
    checked_secret(app.state.store.db, settings.data_dir, "--database" if settings.database else "the store")
    app.state.replica = worker_id()  # this server among the replicas sharing the store: the holder of its claims


async def start(app: FastAPI) -> Stop:
    sweeper = start_sweeper(app)  # expired uploads, their parts and expired files deleted every quotas.sweep_s

    def stop() -> None:
        sweeper.cancel()
        app.state.store.claims.close()

    return stop


ROOM = Room("store", setup=setup, start=start)
