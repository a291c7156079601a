"""The files and fine-tuning room: files, uploads in parts, distillation into a training file, fine-tuning jobs
(their worker is a process of its own, started by ``tunesmith serve``)."""

from __future__ import annotations

from fastapi import FastAPI

from tunesmith.serve.jobs import distill, routes, uploads
from tunesmith.serve.room import Room


def setup(app: FastAPI) -> None:
    app.state.trainable_models = lambda: {app.state.settings.model}


ROOM = Room("jobs", routers=(routes.router, uploads.router, distill.router), setup=setup)
