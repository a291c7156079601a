"""The dashboard's room: the page, its assets and the runs API."""

from tunesmith.serve.dashboard import routes
from tunesmith.serve.room import Room

ROOM = Room("dashboard", mounts=(routes.mount,))
