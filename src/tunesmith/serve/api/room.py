"""The inference room: the engine (the built-in one or vLLM behind tunesmith), the models it serves, the per-key
limits and the middlewares every request passes first, OpenAI's error shapes, and the inference routes (chat,
completions, Responses, embeddings, models, stored completions, the probes)."""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tunesmith.serve.api import health, routes_embeddings, routes_models, routes_openai, routes_responses, stored_completions
from tunesmith.serve.api.auth import bearer_of, owner_of
from tunesmith.serve.api.body_limit import BodyLimit
from tunesmith.serve.api.gate import KeyGate
from tunesmith.serve.api.rate_limits import EdgeLimit, KeyLimiter
from tunesmith.serve.errors import APIError, validation_error_body
from tunesmith.serve.lanes import torch_threads
from tunesmith.serve.room import Room, Stop
from tunesmith.serve.store.database import StoreUnavailable, log_failure

ADAPTER_WATCH_S = 2.0
log = logging.getLogger("tunesmith.serve")


def setup(app: FastAPI) -> None:
    """The limiter (over every replica on PostgreSQL), the middlewares (the key gate runs first: no body of a stranger
    is read; then the early refusal of a key at its limit; then the body's size) and the error handlers."""
    settings = app.state.settings
    app.state.limiter = KeyLimiter(settings.limits_per_key)
    if app.state.store.db.kind == "postgresql":  # replicas: a key's requests in flight counted over all of them
        from tunesmith.serve.api.shared_limits import SharedPlaces

        app.state.limiter.shared = SharedPlaces(app.state.store, app.state.replica)
    app.add_middleware(BodyLimit, max_body=settings.max_body_mb * 1024 * 1024,
                       max_upload=settings.max_upload_mb * 1024 * 1024)
    app.add_middleware(EdgeLimit, limiter_of=lambda: getattr(app.state, "limiter", None),
                       owner_of=lambda scope: owner_of(app, bearer_of(scope)))
    app.add_middleware(KeyGate, keys_of=lambda: settings.api_keys)
    handle_errors(app)


def handle_errors(app: FastAPI) -> None:
    """Every error a client sees in OpenAI's shape: ours, Starlette's, a body that does not validate (400), the store
    away for a moment (503), anything else (500, its detail in the log only)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse({"error": exc.body}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse({"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None,
                                       "code": code}}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(StoreUnavailable)
    async def _store_unavailable(request: Request, exc: StoreUnavailable):
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"error": {"message": "The server cannot reach its database for a moment (it may be "
                                       "restarting); nothing of this request was kept. Retry shortly.",
                                       "type": "server_error", "param": None, "code": "store_unavailable"}},
                            status_code=503, headers={"retry-after": "2"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": {"message": "The server had an error while processing your request.",
                                       "type": "server_error", "param": None, "code": "server_error"}},
                            status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": validation_error_body(exc.errors())}, status_code=400)


async def start(app: FastAPI) -> Stop:
    """The engine (``app.state.injected_engine`` when a test gives one), the served models and their aliases, the
    watcher that loads new fine-tunes into vLLM, the renewal of this replica's places."""
    settings = app.state.settings
    # this thread (the event loop's) loads the model on one torch thread: an OpenMP team started here would live as
    # long as the server beside the engine's, and every team's products run up to 1.5x slower once teams outnumber
    # the cores (a Tinker training step on the engine's thread: 1.10x the same step in process with a team left
    # here; tunesmith.serve.lanes.torch_threads)
    torch_threads(1)
    app.state.engine = getattr(app.state, "injected_engine", None) or make_engine(settings)
    from tunesmith.serve.api.served_models import ServedModels

    app.state.models = ServedModels(app.state.engine, app.state.store, settings.fine_tunes_loaded,
                                    in_use_s=settings.request_timeout_s)
    for name, target in settings.model_aliases.items():
        if target not in routes_embeddings.ENCODER_NAMES and target not in (settings.embedding_models or {}):
            app.state.engine.add_alias(name, target)  # an encoder alias is read by /v1/embeddings
    watcher = asyncio.ensure_future(watch_adapters(app)) if settings.engine == "vllm" else None
    shared = app.state.limiter.shared
    if shared is not None:
        shared.start()

    def stop() -> None:
        if watcher is not None:
            watcher.cancel()
        app.state.engine.close()
        if shared is not None:
            shared.close()

    return stop


def make_engine(settings):
    """The inference engine the settings name: the built-in one, or vLLM behind tunesmith."""
    if settings.engine == "vllm":
        from tunesmith.serve.engines.vllm.engine import VllmEngine

        share = settings.gpu_split.vllm_share if settings.gpu_split is not None else None
        return VllmEngine(settings.model, settings.adapters, settings.vllm_dir, python=settings.vllm_python,
                          request_timeout_s=settings.request_timeout_s, extra_args=settings.vllm_args,
                          gpu_memory_utilization=share)
    from tunesmith.serve.engines.builtin import Engine

    return Engine(settings.model, settings.adapters, settings.max_batch, settings.wait_ms,
                  request_timeout_s=settings.request_timeout_s)


async def watch_adapters(app: FastAPI) -> None:
    """Load each new fine-tune into the engine within seconds of its job succeeding (on any replica), so its first
    request does not wait for vLLM's load; later ones are resolved by name at their first request."""
    since = int(time.time())
    while True:
        await asyncio.sleep(ADAPTER_WATCH_S)
        try:
            since = await asyncio.to_thread(app.state.models.preload, since)
        except Exception as exc:  # noqa: BLE001 - a failed load is retried at the model's next request and logged
            log_failure(log, "loading a fine-tune into the engine failed", exc)


ROOM = Room("api", routers=(health.router, routes_openai.router, stored_completions.router, routes_models.router,
                            routes_responses.router, routes_embeddings.router), setup=setup, start=start)
