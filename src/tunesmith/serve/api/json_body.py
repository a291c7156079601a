"""A request's input read before its route runs: every route of the API is an :class:`OffLoopJSON` route, whose JSON
body is parsed (past :data:`INLINE_BYTES`, in the files lane as its key's work: a 16 MB body, ``--max-body-mb``, takes a
tenth of a second of ``json.loads``, which on the loop every key would wait for) and checked, with its path and query
parameters, for what the store cannot hold (:mod:`tunesmith.serve.store.values`: a NUL outside the route's
:data:`FREE_TEXT`, a lone surrogate, an integer past 64 bits) before FastAPI reads it: a 400 naming the field."""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from tunesmith.serve.api.auth import OWNER_SCOPE, bearer_of, owner_of
from tunesmith.serve.store.values import check_value

INLINE_BYTES = 256 * 1024  # a body this short is parsed where it is read
# the body fields of each route that are text a model or a grader reads, where NUL is text too (kept only inside JSON)
FREE_TEXT = {"/v1/chat/completions": ("messages",), "/v1/completions": ("prompt",),
             "/v1/responses": ("input", "instructions"), "/v1/embeddings": ("input",),
             "/v1/evals": ("testing_criteria",),
             "/v1/evals/{eval_id}/runs": ("data_source.source.content", "data_source.input_messages"),
             "/v1/fine_tuning/alpha/graders/run": ("grader", "item", "model_sample"),
             "/v1/fine_tuning/alpha/graders/validate": ("grader",)}


class OffLoopJSON(APIRoute):
    """An API route whose large JSON body is parsed in a thread (FastAPI then finds it parsed)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        free_text = FREE_TEXT.get(self.path, ())

        async def parsed_first(request: Request):
            check_parameters(request)
            if _json_body(request) and (body := await request.body()):
                if len(body) > INLINE_BYTES:
                    owner = request.scope.get(OWNER_SCOPE) or owner_of(request.app, bearer_of(request.scope))
                    request._json = await request.app.state.lanes.files.run(owner, parsed, body, free_text)
                else:
                    request._json = parsed(body, free_text)  # Starlette's cache, which FastAPI reads
            return await handler(request)

        return parsed_first


def _json_body(request: Request) -> bool:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return request.method in ("POST", "PUT", "PATCH") and (kind == "application/json" or kind.endswith("+json"))


def parsed(body: bytes, free_text: tuple[str, ...] = ()):
    """The body's JSON, checked for what the store cannot hold (NUL accepted under ``free_text``), or FastAPI's own
    400 for a body that is not JSON."""
    try:
        value = json.loads(body)
    except ValueError as exc:  # not JSON, not UTF-8, or a number of more digits than Python reads
        where = getattr(exc, "pos", getattr(exc, "start", 0))
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", where), "msg": "JSON decode error",
                                       "input": {}, "ctx": {"error": getattr(exc, "msg", str(exc))}}]) from None
    except RecursionError:  # arrays or objects nested past what the parser follows
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", 0), "msg": "JSON decode error",
                                       "input": {}, "ctx": {"error": "nested too deeply"}}]) from None
    check_value(value, "", free_text)
    return value


def check_parameters(request: Request) -> None:
    """The path and query parameters, which every route compares in SQL: no NUL, no lone surrogate (400 naming the
    parameter, ``metadata[k]`` as the client sent it)."""
    for name, value in request.path_params.items():
        check_value(value, name)
    for name, value in request.query_params.multi_items():
        check_value(name, name)
        check_value(value, name)
