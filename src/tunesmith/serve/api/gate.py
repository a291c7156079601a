"""The key before the body: a request to the API (``/v1/...``) that carries no key the server knows is answered 401 in
OpenAI's shape before any of its body reaches a route, so a stranger's upload, however large, is never held or parsed.
The rest of its body is read and thrown away, within bounds, before the answer (:class:`Lingering`, as nginx's
lingering close), so that the client reads the 401 rather than a connection reset.

A call made in process (a batch's line, :data:`tunesmith.serve.api.auth.OWNER_SCOPE` on its scope) already runs as its
owner. The routes still read the key themselves (:func:`tunesmith.serve.api.auth.api_key`): this is only the cheap
early answer, in front of every other middleware.
"""

from __future__ import annotations

import hmac

from tunesmith.serve.api.auth import OWNER_SCOPE, bearer_of, tinker_candidates, tinker_key_of
from tunesmith.serve.api.body_limit import Lingering, send_error

API_PREFIX = "/v1/"
TINKER_PREFIX = "/api/v1/"  # the Tinker API (tunesmith.serve.tinker): its key in X-API-Key
UNAUTHORIZED = {"message": "Missing or invalid API key. Send 'Authorization: Bearer <key>'.",
                "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
TINKER_UNAUTHORIZED = {**UNAUTHORIZED, "message": "Missing or invalid API key. Send 'X-API-Key: tml-<your key>'."}


def known(key: str | None, keys) -> bool:
    """Whether ``key`` is one of ``keys``, compared in constant time (a key's prefix is not timed out of it)."""
    if key is None:
        return False
    found = False
    for k in keys:
        found |= hmac.compare_digest(key.encode(), k.encode())
    return found


class KeyGate:
    """Pure ASGI middleware: 401 for an API request without a known key, its body thrown away unread."""

    def __init__(self, app, keys_of):
        self.app, self.keys_of = app, keys_of
        self.lingering = Lingering()

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path.startswith((API_PREFIX, TINKER_PREFIX)) and OWNER_SCOPE not in scope:
            keys = self.keys_of()
            if keys:
                given = [bearer_of(scope)] if path.startswith(API_PREFIX) else tinker_candidates(tinker_key_of(scope))
                if not any(known(k, keys) for k in given):
                    await self.lingering.drain(scope, receive)
                    said = UNAUTHORIZED if path.startswith(API_PREFIX) else TINKER_UNAUTHORIZED
                    return await send_error(send, 401, said, {"connection": "close"})
        await self.app(scope, receive, send)
