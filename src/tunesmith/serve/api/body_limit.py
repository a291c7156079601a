"""The request body cap: every request's body is counted as it arrives, before any route reads it, and one past
its limit is answered 413 in OpenAI's error shape (a declared ``Content-Length`` past it at once, unread).

Only a file's multipart body (``POST /v1/files``, ``POST /v1/uploads/{id}/parts``) may carry the server's
``--max-upload-mb``; every other body, JSON routes under ``/v1/files`` and ``/v1/uploads`` included, ``--max-body-mb``:
enough for the longest prompt the model's context takes and far less than a tenant could make the server hold.
Keys are checked before this (:class:`tunesmith.serve.api.gate.KeyGate`): no body of a request without one is read.

A refused request whose body is still arriving is answered as nginx's lingering close does (:class:`Lingering`): the
rest of its body is read and thrown away, for at most :data:`LINGER_S` seconds (:data:`LINGER_IDLE_S` between two of
its chunks) and :data:`LINGER_BYTES`, before the answer; closed at once, the socket would be reset while the client
still sends, and the client would read a connection reset instead of the 401 or 413. Nothing read is kept, and at
most :data:`LINGERING` requests linger at once (past them, the answer comes at once).
"""

from __future__ import annotations

import asyncio
import json
import re

FILE_BODY = re.compile(r"^/v1/(files|uploads/[^/]+/parts)/?$")  # the routes whose multipart body is a file
MULTIPART_SLACK = 1024 * 1024  # a multipart body's own framing beside the file
LINGER_S, LINGER_IDLE_S = 30.0, 5.0  # nginx's lingering_time and lingering_timeout
LINGER_BYTES = 1024**3  # read and thrown away at most, per refused request (a declared length past it: answered at once)
LINGERING = 8  # refused requests read at once, at most


class Lingering:
    """The rest of a refused request's body read and thrown away before its answer, within bounds."""

    def __init__(self, most: int = LINGERING):
        self.most, self.now = most, 0

    async def drain(self, scope, receive) -> None:
        """Read ``receive`` to the body's end, unless the client waits for ``100 Continue`` (it sends nothing until
        told to), declares more than :data:`LINGER_BYTES`, or :data:`LINGERING` requests linger already; stop at the
        time and byte bounds."""
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"0")
        if b"100-continue" in headers.get(b"expect", b"").lower() or self.now >= self.most or \
                not declared.isdigit() or int(declared) > LINGER_BYTES:
            return
        self.now += 1
        try:
            await _read_to_end(receive)
        finally:
            self.now -= 1


async def _read_to_end(receive) -> None:
    loop = asyncio.get_running_loop()
    deadline, seen = loop.time() + LINGER_S, 0
    while (left := min(LINGER_IDLE_S, deadline - loop.time())) > 0 and seen <= LINGER_BYTES:
        try:
            message = await asyncio.wait_for(receive(), left)
        except TimeoutError:
            return
        if message["type"] != "http.request" or not message.get("more_body"):
            return
        seen += len(message.get("body", b""))


class _TooLarge(BaseException):
    """Raised from ``receive`` once the body passes its limit (a BaseException: no route's handler catches it)."""


class BodyLimit:
    """Pure ASGI middleware: ``max_body`` bytes for a request body, ``max_upload`` for an upload's."""

    def __init__(self, app, max_body: int, max_upload: int):
        self.app, self.max_body, self.max_upload = app, max_body, max_upload
        self.lingering = Lingering()

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
            await self.lingering.drain(scope, receive)
            return await refuse(send, limit)
        seen, started, more = 0, False, True

        async def counted():
            nonlocal seen, more
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                more = message.get("more_body", False)
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
                if more:
                    await self.lingering.drain(scope, receive)
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
