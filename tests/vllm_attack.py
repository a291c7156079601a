"""An attacker on the same host, as its own process: given vLLM's socket path and routes (JSON on stdin), it
sends each route's methods without a key and with a wrong key, and (when started as root) tries the socket
again as another user (nobody). Prints what it got as JSON: ``{"statuses": {"GET /metrics": [401, 401], ...},
"other_user": "refused: ..." | "connected" | "not tried"}``.

    python tests/vllm_attack.py < {"socket": PATH, "routes": [[PATH, [METHODS]], ...]}
"""

import json
import os
import re
import socket
import sys


def status(path: str, method: str, route: str, key: str | None) -> int:
    body = b"{}" if method in ("POST", "PUT", "PATCH", "DELETE") else b""
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = (f"{method} {route} HTTP/1.1\r\nHost: vllm\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(path)
        s.sendall(head + body)
        first = s.recv(64)
    return int(first.split(b" ")[1])


def as_nobody(path: str) -> str:
    """Another user's attempt: a child that drops to nobody and connects."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path)
            answer = "connected"
        except OSError as exc:
            answer = f"refused: {exc}"
        os.write(write, answer.encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    return os.read(read, 4096).decode()


def main() -> None:
    job = json.load(sys.stdin)
    statuses = {}
    for route, methods in job["routes"]:
        concrete = re.sub(r"\{[^}]+\}", "x", route)
        for method in methods:
            statuses[f"{method} {route}"] = [status(job["socket"], method, concrete, key)
                                             for key in (None, "not-the-key")]
    other = as_nobody(job["socket"]) if os.geteuid() == 0 else "not tried"
    print(json.dumps({"statuses": statuses, "other_user": other}))


if __name__ == "__main__":
    main()
