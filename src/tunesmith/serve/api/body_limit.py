"""The request body cap: every request's body is counted as it arrives, before any route reads it, and one past
its limit is answered 413 in OpenAI's error shape (a declared ``Content-Length`` past it at once, unread).

Only a file's multipart body (``POST /v1/files``, ``POST /v1/uploads/{id}/parts``) may carry the server's
``--max-upload-mb``; every other body, JSON routes under ``/v1/files`` and ``/v1/uploads`` included, ``--max-body-mb``:
enough for the longest prompt the model's context takes and far less than a tenant could make the server hold.
Keys are checked before this (:class:`tunesmith.serve.api.gate.KeyGate`): no body of a request without one is read.
"""

from __future__ import annotations

import json
import re

FILE_BODY = re.compile(r"^/v1/(files|uploads/[^/]+/parts)/?$")  # the routes whose multipart body is a file
MULTIPART_SLACK = 1024 * 1024  # a multipart body's own framing beside the file


class _TooLarge(BaseException):
    """Raised from ``receive`` once the body passes its limit (a BaseException: no route's handler catches it)."""


class BodyLimit:
    """Pure ASGI middleware: ``max_body`` bytes for a request body, ``max_upload`` for an upload's."""

    def __init__(self, app, max_body: int, max_upload: int):
        self.app, self.max_body, self.max_upload = app, max_body, max_upload

    def limit_for(self, method: str, path: str, content_type: bytes) -> int:
        """The upload limit for a file's multipart body, the body limit for anything else."""
        if method == "POST" and FILE_BODY.match(path) and content_type.lower().startswith(b"multipart/form-data"):
            return self.max_upload + MULTIPART_SLACK
        return self.max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        limit = self.limit_for(scope.get("method", ""), scope.get("path", ""), headers.get(b"content-type", b""))
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await refuse(send, limit)
        seen, started = 0, False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await refuse(send, limit)


async def refuse(send, limit: int) -> None:
    await send_error(send, 413, {"message": f"The request body is larger than this server's limit of "
                                            f"{limit / 1024 / 1024:.0f} MB.", "type": "invalid_request_error",
                                 "param": None, "code": "request_too_large"}, {"connection": "close"})


async def send_error(send, status: int, error: dict, headers: dict[str, str] | None = None) -> None:
    """An error in OpenAI's shape (``{"error": error}``) answered from ASGI middleware, before any route runs."""
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *((k.encode(), v.encode()) for k, v in (headers or {}).items())]})
    await send({"type": "http.response.body", "body": body})
