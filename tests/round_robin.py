"""A per-request round robin in front of several `tunesmith serve` replicas, as nginx or HAProxy configured by
docs/serve.md sends requests: each to the next replica in turn, to the one after when it cannot connect. Used by the
replica tests and benchmarks/tinker_api.py."""

from __future__ import annotations

import contextlib
import itertools
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx


@contextlib.contextmanager
def round_robin(upstreams: list[str]):
    """An HTTP proxy sending each request to the next of ``upstreams`` in turn, and to the one after when it cannot
    connect (nginx's ``proxy_next_upstream error``); a request cut off mid-way is a 502 (the SDK retries it). Yields
    its URL and the (upstream, path) of each request it forwarded."""
    turn, sent, guard = itertools.count(), [], threading.Lock()
    client = httpx.Client(timeout=120)

    class Forward(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("host", "content-length", "connection", "accept-encoding")}
            first = next(turn)
            for i in range(len(upstreams)):
                upstream = upstreams[(first + i) % len(upstreams)]
                try:
                    r = client.request(self.command, upstream + self.path, content=body, headers=headers)
                    break
                except httpx.ConnectError:
                    continue
                except httpx.TransportError:
                    r = None
                    break
            else:
                r = None
            if r is None:
                self.send_response(502)
                self.send_header("content-length", "0")
                self.end_headers()
                return
            with guard:
                sent.append((upstream, self.path))
            self.send_response(r.status_code)
            for k, v in r.headers.items():
                if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                    self.send_header(k, v)
            self.send_header("content-length", str(len(r.content)))
            self.end_headers()
            self.wfile.write(r.content)

        do_GET = do_POST = do_PUT = do_DELETE = _forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", sent
    finally:
        server.shutdown()
        client.close()
