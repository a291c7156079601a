"""A batch file's lines: checked at upload (UTF-8, ``{"custom_id", "method": "POST", "url", "body"}``, unique
``custom_id``s, a URL this server batches, a JSON object body, no streaming, nested at most
:data:`tunesmith.data.formats.json_lines.MAX_DEPTH` levels; each bad line named) and the output and error files written
in OpenAI's format."""

from __future__ import annotations

import secrets
from pathlib import Path

from tunesmith.data.formats.json_lines import NotUTF8, json_line, utf8_lines
from tunesmith.serve.errors import APIError
from tunesmith.serve.store.values import check_value

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
MAX_LINES = 50_000  # as at OpenAI
MOST_NAMED = 5


def check_batch_file(path: str | Path, max_lines: int | None = MAX_LINES) -> list[str]:
    """The problems of the batch file at ``path`` (read a line at a time), the first :data:`MOST_NAMED` named with
    their line; [] when it is one. ``max_lines``: the most requests a batch holds (None: no limit)."""
    problems, seen, count = [], set(), 0
    try:
        for n, line in utf8_lines(path):
            if not line.strip():
                continue
            count += 1
            if len(problems) < MOST_NAMED and (why := _line_problem(line, seen)):
                problems.append(f"line {n}: {why}")
    except NotUTF8 as bad:
        return [str(bad)]
    if not problems and not count:
        problems.append("the file holds no request")
    if max_lines is not None and count > max_lines:
        problems.append(f"{count:,} requests; a batch holds at most {max_lines:,}")
    return problems


def _line_problem(line: str, seen: set[str]) -> str | None:
    row, why = json_line(line)
    if why:
        return why
    if not isinstance(row, dict):
        return "not a JSON object"
    extra = set(row) - {"custom_id", "method", "url", "body"}
    if extra:
        return f"unknown field {sorted(extra)[0]!r} (a request is custom_id, method, url, body)"
    cid = row.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return "custom_id must be a non-empty string"
    if why := _unstorable(cid, "custom_id"):
        return why
    if cid in seen:
        return f"custom_id {cid!r} is used twice"
    seen.add(cid)
    if row.get("method") != "POST":
        return "method must be POST"
    if row.get("url") not in URLS:
        return f"url {row.get('url')!r} is not batched here; one of {', '.join(URLS)}"
    body = row.get("body")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return "body must be a JSON object with a model"
    if why := _unstorable(body["model"], "body.model"):
        return why
    if body.get("stream"):
        return "body.stream: a batch's answers are not streamed"
    return None


def _unstorable(text: str, param: str) -> str | None:
    """Why ``text`` cannot be kept in its column (a NUL, a lone surrogate), or None."""
    try:
        check_value(text, param)
    except APIError as exc:
        return exc.body["message"]
    return None


def output_line(custom_id: str, status_code: int, body: dict) -> dict:
    """One line of the output file (a 2xx answer) or the error file (anything else), as OpenAI writes them."""
    ok = 200 <= status_code < 300
    error = None if ok else {"code": (body.get("error") or {}).get("code") or f"http_{status_code}",
                             "message": (body.get("error") or {}).get("message") or f"status {status_code}"}
    return {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": f"req_{secrets.token_hex(12)}", "body": body},
            "error": error}


def usage_of(body: dict) -> tuple[int, int]:
    """(input, output) tokens of one answer's usage (chat/completions or Responses naming)."""
    usage = body.get("usage") or {}
    return (usage.get("prompt_tokens", usage.get("input_tokens", 0)) or 0,
            usage.get("completion_tokens", usage.get("output_tokens", 0)) or 0)
