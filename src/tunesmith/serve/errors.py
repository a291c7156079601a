"""The API's own error type, shared by the app and its routes (no import cycle between them)."""

from __future__ import annotations

import re

# the tags pydantic adds to an error's location for the member of a union it tried ("int", "literal['auto']")
_UNION_TAG = re.compile(r"^(int|float|str|bool|none|[a-z-]+\[.*\])$")


class APIError(Exception):
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.body = status, {"message": message, "type": type_, "param": param, "code": code}
        self.headers = headers or {}  # e.g. a 429's retry-after and x-ratelimit-*


def validation_error_body(errors: list[dict]) -> dict:
    """A request-body validation failure in OpenAI's shape: ``param`` is the dotted field path (pydantic's
    union-member tags removed); the message joins what each member of a union would accept."""

    def where(error: dict) -> str:
        parts = [str(p) for p in error["loc"] if p != "body" and not (isinstance(p, str) and _UNION_TAG.match(p))]
        return ".".join(parts)

    param = where(errors[0])
    messages = list(dict.fromkeys(e["msg"] for e in errors if where(e) == param))
    return {"message": f"{param}: {' or '.join(messages)}", "type": "invalid_request_error", "param": param or None,
            "code": None}


def found(obj, what: str, name: str, param: str):
    """``obj``, or a 404 in OpenAI's shape naming ``what`` was not found and the ``param`` that named it."""
    if obj is None:
        raise APIError(404, f"No such {what}: {name}", param=param, code="not_found")
    return obj
