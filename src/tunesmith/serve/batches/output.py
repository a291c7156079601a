"""A batch's files on disk: its input read a chunk of lines at a time, and its output and error files appended as
answers come (``<data dir>/batches/<batch id>/``), each line written in OpenAI's format around the answer's own JSON
bytes (never parsed and written again: an embeddings answer is megabytes). Everything here runs off the event loop,
in the files lane."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tunesmith.serve.batches.lines import output_line

NAMES = ("output", "error")
PARSED_ERROR_BYTES = 1 << 20  # an error answer longer than this is not read for its code and message


class InputLines:
    """A batch file's requests in order, each with its line number, skipping the lines in ``done``."""

    def __init__(self, path: str | Path, done: set[int]):
        self.path, self.done, self.number = Path(path), done, 0
        self.file = None

    def __enter__(self) -> InputLines:
        self.file = open(self.path, "rb")  # noqa: SIM115 - closed by __exit__
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def next_chunk(self, most: int) -> list[dict]:
        """Up to ``most`` requests not answered yet ([] at the end of the file)."""
        out = []
        while len(out) < most:
            raw = self.file.readline()
            if not raw:
                break
            self.number += 1
            if raw.strip() and self.number not in self.done:  # checked at upload (a file kept before UTF-8 was
                out.append(json.loads(raw.decode("utf-8", "replace")) | {"line": self.number})  # checked: replaced)
        return out


def scan_input(path: str | Path, endpoint: str) -> tuple[int, str | None, dict | None]:
    """(requests, the first request's model, the first request whose URL is not ``endpoint``) of a checked batch
    file, read line by line."""
    count, model, wrong = 0, None, None
    with InputLines(path, set()) as lines:
        while chunk := lines.next_chunk(256):
            for request in chunk:
                count += 1
                model = model or request["body"]["model"]
                if wrong is None and request["url"] != endpoint:
                    wrong = request
    return count, model, wrong


class BatchFiles:
    """The output and error files of one batch, appended as its lines are answered."""

    def __init__(self, root: Path, batch_id: str):
        self.folder = Path(root) / "batches" / batch_id
        self.paths = {name: self.folder / f"{name}.jsonl" for name in NAMES}

    def cut_to(self, output_bytes: int, error_bytes: int) -> None:
        """Each file back to the length the store recorded with its last answer: a line written by a server that
        stopped before recording it is dropped (its request is answered again)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, length in zip(NAMES, (output_bytes, error_bytes), strict=True):
            path = self.paths[name]
            if path.exists() and path.stat().st_size > length:
                os.truncate(path, length)

    def append(self, custom_id: str, status: int, body: bytes) -> tuple[int, int]:
        """One answer appended to the output file (2xx) or the error file; returns both files' lengths."""
        name = "output" if 200 <= status < 300 else "error"
        with open(self.paths[name], "ab") as f:
            f.write(line_bytes(custom_id, status, body))
        return self.sizes()

    def sizes(self) -> tuple[int, int]:
        return tuple(p.stat().st_size if p.exists() else 0 for p in self.paths.values())  # type: ignore[return-value]

    def finished(self) -> list[tuple[str, Path]]:
        """The files that hold answers, by name."""
        return [(name, p) for name, p in self.paths.items() if p.exists() and p.stat().st_size]


def line_bytes(custom_id: str, status: int, body: bytes) -> bytes:
    """One line of the output or error file, as OpenAI writes it, with ``body`` (the answer's JSON) as it came."""
    if not _is_json(body):
        body = json.dumps({"error": {"message": body.decode("utf-8", "replace")[:2000], "type": "server_error",
                                     "param": None, "code": "invalid_answer"}}).encode()
    doc = output_line(custom_id, status, _error_of(status, body))
    head, tail = json.dumps(doc["response"] | {"body": None}, ensure_ascii=False).rsplit("null", 1)
    response = head.encode() + body.strip() + tail.encode()
    return (b'{"id": ' + json.dumps(doc["id"]).encode() + b', "custom_id": ' + json.dumps(custom_id).encode() +
            b', "response": ' + response + b', "error": ' + json.dumps(doc["error"]).encode() + b"}\n")


def _is_json(body: bytes) -> bool:
    stripped = body.strip()
    return stripped[:1] in (b"{", b"[") and b"\n" not in stripped


def _error_of(status: int, body: bytes) -> dict:
    """What :func:`output_line` needs of an error answer (its code and message); a 2xx answer is not read."""
    if 200 <= status < 300 or len(body) > PARSED_ERROR_BYTES:
        return {}
    try:
        doc = json.loads(body)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def failure_body(message: str) -> bytes:
    return json.dumps({"error": {"message": message[:500], "type": "server_error", "param": None,
                                 "code": "batch_line_failed"}}).encode()

