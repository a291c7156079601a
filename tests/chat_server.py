"""A small OpenAI-compatible chat server with scripted replies, latency and failures.

Used by the test suite and the benchmarks to exercise clients, retries, timeouts and the call cache
without a network: it listens on 127.0.0.1 and answers ``POST /v1/chat/completions``.

- :class:`DummyChatServer` answers with ``reply(messages)``: a text, or ``(status, text, delay_s)`` to
  script one answer's HTTP status (an error body carrying ``text``) and latency. Its options inject the
  same failure for every request (``fail_first``, ``fail_status``), a wrong key, malformed bodies, a
  server without ``response_format`` support or a latency for every answer; it counts attempts,
  completions and requests whose client left before the answer.
- :func:`serve` yields the base URL of one that answers with ``reply(content, n) -> (status, text,
  delay_s)``: the last message's content, and how many times that content was asked before.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Answer = str | tuple[int, str, float]  # a text, or (HTTP status, text or error message, delay in seconds)


def _peer_closed(sock) -> bool:
    """True when the client has closed its end (readable with no data)."""
    import select
    import socket

    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # many clients connect at once
    daemon_threads = True


class DummyChatServer:
    def __init__(
        self,
        reply: Callable[[list[dict]], Answer] = lambda messages: "ok",
        latency_s: float = 0.0,
        fail_first: int = 0,
        fail_status: int = 429,
        api_key: str | None = None,
        malformed: bool = False,
        reject_response_format: bool = False,
    ):
        """``fail_first``: each distinct request gets ``fail_status`` that many times before succeeding;
        ``reject_response_format``: answer 400 to a request with ``response_format``, as servers without
        JSON-schema support do. ``response_formats`` records every ``response_format`` received."""
        self.reply, self.latency_s = reply, latency_s
        self.fail_first, self.fail_status = fail_first, fail_status
        self.api_key, self.malformed = api_key, malformed
        self.reject_response_format, self.response_formats = reject_response_format, []
        self.lock = threading.Lock()
        self.attempts: Counter[str] = Counter()  # every HTTP request, per request body
        self.completed: Counter[str] = Counter()  # successful completions, per request body
        self.abandoned = 0  # requests whose client disconnected before the reply
        self.httpd = _Server(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @property
    def total_completed(self) -> int:
        return sum(self.completed.values())

    def __enter__(self) -> DummyChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, body: dict | str, headers: dict | None = None) -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout under test)
                    pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw or b"{}")
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self._send(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                if "response_format" in body:
                    server.response_formats.append(body["response_format"])
                    if server.reject_response_format:
                        return self._send(400, {"error": {"message": "response_format is not supported",
                                                          "type": "invalid_request_error"}})
                digest = hashlib.sha256(raw).hexdigest()
                with server.lock:
                    server.attempts[digest] += 1
                    failing = server.attempts[digest] <= server.fail_first
                if failing:  # a rate limiter answers before doing the work
                    return self._send(server.fail_status, {"error": {"message": "injected failure"}}, {"retry-after": "0"})
                if server.latency_s:
                    time.sleep(server.latency_s)
                if _peer_closed(self.connection):  # the client died while we "thought": not a completed call
                    with server.lock:
                        server.abandoned += 1
                    return None
                if server.malformed:
                    return self._send(200, "{this is not json")
                messages = body.get("messages", [])
                n = int(body.get("n") or 1)
                answer = server.reply(messages)
                status, text, delay = answer if isinstance(answer, tuple) else (200, answer, 0)
                if delay:
                    time.sleep(delay)
                if status != 200:
                    return self._send(status, {"error": {"message": text, "type": "server_error", "code": None}})
                with server.lock:
                    server.completed[digest] += 1
                self._send(200, {
                    "id": "chatcmpl-dummy", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", "dummy"),
                    "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                                for i in range(n)],
                    "usage": {"prompt_tokens": sum(len(m.get("content", "").split()) for m in messages),
                              "completion_tokens": len(text.split()) * n,
                              "total_tokens": 0},
                })

        return Handler


@contextmanager
def serve(reply: Callable[[str, int], tuple[int, str, float]]) -> Iterator[str]:
    """The base URL of a :class:`DummyChatServer` answering ``reply(content, n) -> (status, text, delay_s)``,
    ``content`` being the last message's and ``n`` how many times the same content was asked before."""
    seen: Counter[str] = Counter()
    lock = threading.Lock()

    def by_content(messages: list[dict]) -> Answer:
        content = messages[-1]["content"]
        with lock:
            n = seen[content]
            seen[content] += 1
        return reply(content, n)

    with DummyChatServer(by_content) as server:
        yield server.base_url
