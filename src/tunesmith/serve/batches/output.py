"""A batch's files on disk (``<data dir>/batches/<batch id>/``, on the folder every replica shares): its input split
into chunks and read a few lines at a time, each chunk's answers appended to its own part files as they come, and
the batch's output and error files assembled from the parts in chunk order once every chunk is done. Each line is
written in OpenAI's format around the answer's own JSON bytes (never parsed and written again: an embeddings answer
is megabytes). Everything here runs off the event loop, in the files lane."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path

from tunesmith.serve.batches.lines import output_line

NAMES = ("output", "error")
PARSED_ERROR_BYTES = 1 << 20  # an error answer longer than this is not read for its code and message
COPY_BYTES = 1 << 20  # a part copied into the batch's file this much at a time


class InputLines:
    """A batch file's requests in order, each with its line number, skipping the lines in ``done``; with ``chunk``
    (a row of ``batch_chunks``), only that chunk's lines, read from its first byte."""

    def __init__(self, path: str | Path, done: set[int], chunk: dict | None = None):
        self.path, self.done, self.number = Path(path), done, 0
        self.start, self.last = 0, None
        if chunk is not None:
            self.start, self.number = chunk["first_byte"], chunk["first_line"] - 1
            self.last = chunk["first_line"] + chunk["lines"] - 1
        self.file = None

    def __enter__(self) -> InputLines:
        self.file = open(self.path, "rb")  # noqa: SIM115 - closed by __exit__
        self.file.seek(self.start)
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def next_chunk(self, most: int) -> list[dict]:
        """Up to ``most`` requests not answered yet ([] at the end of the file)."""
        out = []
        while len(out) < most and (self.last is None or self.number < self.last):
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


def chunk_bounds(path: str | Path, size: int) -> list[tuple[int, int, int, int]]:
    """The chunks of ``size`` requests of a checked batch file, in order, each (its first line, the lines it spans,
    the byte its first line starts at, its requests), read line by line."""
    out, number, offset, first, first_byte, count = [], 0, 0, 0, 0, 0
    with open(path, "rb") as f:
        for raw in iter(f.readline, b""):
            number += 1
            if raw.strip():
                if not count:
                    first, first_byte = number, offset
                count += 1
                if count == size:
                    out.append((first, number - first + 1, first_byte, count))
                    count = 0
            offset += len(raw)
    if count:
        out.append((first, number - first + 1, first_byte, count))
    return out


class BatchFiles:
    """The output and error files of one chunk of a batch (``chunk``) written by the holder of one ``generation`` of
    its claim, appended as its lines are answered (generation 0: a version before the generations wrote them); without
    ``chunk``, the whole batch's, as a version before the chunks wrote them."""

    def __init__(self, root: Path, batch_id: str, chunk: int | None = None, generation: int = 0):
        self.folder = Path(root) / "batches" / batch_id
        self.chunk = chunk
        stem = "" if chunk is None else f"chunk-{chunk:06d}-" + (f"g{generation}-" if generation else "")
        self.paths = {name: self.folder / f"{stem}{name}.jsonl" for name in NAMES}

    def start_from(self, before: BatchFiles, output_bytes: int, error_bytes: int) -> None:
        """These files made anew from the first ``output_bytes`` and ``error_bytes`` of ``before``'s (what the chunk's
        store recorded of them): a line written past the record by a holder that lost its claim is not copied."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if before.paths == self.paths:
            return self.cut_to(output_bytes, error_bytes)
        for name, length in zip(NAMES, (output_bytes, error_bytes), strict=True):
            aside = self.paths[name].with_suffix(".copying")
            with open(aside, "wb") as out:
                _copy(before.paths[name], length, out)
            os.replace(aside, self.paths[name])
        return None

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

    def remove(self) -> None:
        """These files; for a chunk, those of every generation of its claim."""
        for path in self.paths.values():
            path.unlink(missing_ok=True)
        if self.chunk is not None and self.folder.is_dir():
            for path in self.folder.glob(f"chunk-{self.chunk:06d}-*"):
                path.unlink(missing_ok=True)


def assemble(root: Path, batch_id: str, head: tuple[int, int], chunks: list[dict]) -> list[tuple[str, Path]]:
    """The batch's output and error files, each made of what an earlier version wrote for the whole batch (its
    recorded lengths ``head``), then each chunk's part in chunk order, up to the part's recorded length (a line
    written past it was never recorded: it is not the batch's). Returns (name, path) of the files that hold answers,
    each under a name of its own: a replica that takes the finishing over writes its own."""
    parts = [(BatchFiles(root, batch_id), head)]
    parts += [(BatchFiles(root, batch_id, c["chunk"], c.get("parts_generation") or 0),
               (c["output_bytes"], c["error_bytes"])) for c in chunks]
    made = []
    for i, name in enumerate(NAMES):
        path = parts[0][0].folder / f"{name}.{secrets.token_hex(6)}.assembled"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as out:
            for files, lengths in parts:
                _copy(files.paths[name], lengths[i], out)
        if path.stat().st_size:
            made.append((name, path))
        else:
            path.unlink()
    return made


def _copy(path: Path, length: int, out) -> None:
    """The first ``length`` bytes of ``path`` appended to ``out``."""
    if not length:
        return
    with open(path, "rb") as f:
        left = length
        while left:
            block = f.read(min(left, COPY_BYTES))
            if not block:
                raise OSError(f"{path} holds {length - left:,} bytes, {length:,} recorded")
            out.write(block)
            left -= len(block)


def remove_parts(root: Path, batch_id: str, chunks: list[dict]) -> None:
    """The batch's part files (and an earlier version's files) removed once its output and error files are kept."""
    BatchFiles(root, batch_id).remove()
    for chunk in chunks:
        BatchFiles(root, batch_id, chunk["chunk"]).remove()
    with contextlib.suppress(OSError):  # not empty: another finisher's assembled file, removed by it
        (Path(root) / "batches" / batch_id).rmdir()


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

