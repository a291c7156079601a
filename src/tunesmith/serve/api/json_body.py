"""A large JSON body parsed off the event loop: every route of the API is an :class:`OffLoopJSON` route, whose body,
past :data:`INLINE_BYTES`, is parsed in the files lane as its key's work before FastAPI reads it. A 16 MB body
(``--max-body-mb``) takes a tenth of a second of ``json.loads``: on the loop, every key would wait that long."""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from tunesmith.serve.api.auth import OWNER_SCOPE, bearer_of, owner_of

INLINE_BYTES = 256 * 1024  # a body this short is parsed where it is read


class OffLoopJSON(APIRoute):
    """An API route whose large JSON body is parsed in a thread (FastAPI then finds it parsed)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def parsed_first(request: Request):
            if _json_body(request):
                body = await request.body()
                if len(body) > INLINE_BYTES:
                    owner = request.scope.get(OWNER_SCOPE) or owner_of(request.app, bearer_of(request.scope))
                    request._json = await request.app.state.lanes.files.run(owner, parsed, body)  # Starlette's cache
            return await handler(request)

        return parsed_first


def _json_body(request: Request) -> bool:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return request.method in ("POST", "PUT", "PATCH") and (kind == "application/json" or kind.endswith("+json"))


def parsed(body: bytes):
    """The body's JSON, or FastAPI's own 400 for a body that is not JSON."""
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error",
                                       "input": {}, "ctx": {"error": exc.msg}}]) from None
