"""FastAPI app factory. Nothing heavy happens at import: the model loads when the app starts."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tunesmith.graders.sandbox import Limits
from tunesmith.serve.api.auth import bearer_of, owner_of
from tunesmith.serve.api.rate_limits import EdgeLimit, KeyLimiter, KeyLimits
from tunesmith.serve.errors import APIError, validation_error_body
from tunesmith.serve.lanes import Lanes
from tunesmith.serve.store.database import StoreUnavailable
from tunesmith.serve.store.quotas import Quotas, start_sweeper


@dataclass
class ServeSettings:
    model: str = "smollm2-135m-instruct"
    adapters: dict[str, str] = field(default_factory=dict)
    api_keys: frozenset[str] = frozenset()  # empty: no authentication (the server binds to 127.0.0.1 by default)
    max_batch: int = 64
    wait_ms: float = 15.0
    data_dir: Path = Path("tunesmith-data")  # files, jobs database, job runs
    database: str | None = None  # a postgresql:// URL holding the tables (replicas share it); None: SQLite in data_dir
    instance: str = ""  # a replica's own name (host-port): its vLLM's log and endpoint under vllm/<instance>
    runs_dir: Path = Path("runs")  # the experiments `tunesmith run` wrote, shown in the dashboard
    max_upload_mb: int = 512
    max_body_mb: int = 16  # any other request's body (413 past it: tunesmith.serve.api.body_limit)
    max_tokens: int = 4096  # the most tokens one request may generate (also capped by the context left)
    request_timeout_s: float = 300.0  # a generation still running then stops with finish_reason "length"
    fine_tunes_loaded: int = 8  # fine-tunes kept loaded per replica; the least recently used past it evicted
    docs: bool | None = None  # /docs and /openapi.json; None: on only when no API keys are set
    allow_random_model: bool = False  # serve a random:<arch> model (random weights) anyway
    allow_python_graders: bool | None = None  # run callers' python graders; None: only when no API keys are set
    grader_limits: Limits = field(default_factory=Limits)  # CPU, memory and wall-clock of one python grader row
    model_aliases: dict[str, str] = field(default_factory=dict)  # a name scripts use -> a served model
    embedding_models: dict[str, str] | None = None  # name -> encoder folder; None: the shipped encoders
    engine: str = "builtin"  # builtin, or vllm: generation on a vLLM server tunesmith supervises
    vllm_python: str | None = None  # the Python that has vLLM (None: see tunesmith.serve.engines.vllm.server.vllm_python)
    vllm_args: tuple[str, ...] = ()  # more arguments for vLLM's server (e.g. --tensor-parallel-size 2)
    vllm_gpu_share: float = 0.5  # on CUDA: vLLM's share of the GPU's memory; the jobs worker has the rest
    gpu_split: object | None = None  # the GpuSplit taken at start (tunesmith.serve.engines.gpu_split), None on a CPU
    key_limits: KeyLimits = field(default_factory=KeyLimits)  # per-key requests in flight, tokens a minute (off)
    batch_concurrency: int | None = None  # a batch's lines in flight at once; None: half the batch (vLLM: 128)
    batch_chunk_lines: int | None = None  # a batch's lines claimed together by one replica; None: 256
    quotas: Quotas = field(default_factory=Quotas)  # what one key may keep (tunesmith.serve.store.quotas)

    @property
    def vllm_dir(self) -> Path:
        """This server's vLLM log and endpoint file: replicas sharing a data folder each have their own."""
        return self.data_dir / "vllm" / self.instance if self.instance else self.data_dir / "vllm"

    @property
    def engine_batch(self) -> int:
        """The rows the engine decodes together: ``max_batch`` on the built-in engine, 256 on vLLM."""
        return 256 if self.engine == "vllm" else self.max_batch

    @property
    def limits_per_key(self) -> KeyLimits:
        """The per-key limits in force: as set; unset on a server with several keys, one batch's worth of requests
        in flight per key (:attr:`engine_batch`) so that no key can hold the engine's whole line; unset on a
        server with one key or none, no limit."""
        if self.key_limits.on or len(self.api_keys) < 2:
            return self.key_limits
        return KeyLimits(requests=self.engine_batch)

    @property
    def batch_lines_in_flight(self) -> int:
        """A batch's lines in flight at once: as set, else half the engine's batch."""
        if self.batch_concurrency is not None:
            return self.batch_concurrency
        return max(1, self.engine_batch // 2)

    @property
    def python_graders_on(self) -> bool:
        return (not self.api_keys) if self.allow_python_graders is None else self.allow_python_graders

    @property
    def docs_on(self) -> bool:
        return (not self.api_keys) if self.docs is None else self.docs

    @classmethod
    def keys_from_env(cls, keys_file: Path | None = None) -> frozenset[str]:
        """Keys from ``TUNESMITH_API_KEYS`` (comma-separated) and/or a file with one key per line."""
        keys = {k.strip() for k in os.environ.get("TUNESMITH_API_KEYS", "").split(",") if k.strip()}
        if keys_file is not None:
            keys |= {k.strip() for k in Path(keys_file).read_text().splitlines() if k.strip() and not k.startswith("#")}
        return frozenset(keys)


def freeze_startup_heap() -> None:
    """Move what the start built (the model, the libraries, the app: ~465k objects with the embedded model) out of
    the garbage collector's sight: they live as long as the server. A full collection of them took 0.22 s on 2 cores,
    holding the GIL on whichever thread allocated at that moment, so every tenant's decoding stalled with it (the
    noisy-neighbour benchmark's p99 spikes); after the freeze it takes microseconds."""
    import gc

    gc.collect()
    gc.freeze()


def create_app(settings: ServeSettings | None = None, engine=None) -> FastAPI:
    """Build the app; ``engine`` may be injected (tests), otherwise it is created at startup."""
    settings = settings or ServeSettings()
    if engine is None and not settings.allow_random_model:
        from tunesmith.models.random_weights import refuse_random

        refuse_random(settings.model, "serve", "--allow-random-model")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine = engine or make_engine(settings)
        from tunesmith.serve.api.served_models import ServedModels

        app.state.models = ServedModels(app.state.engine, app.state.store, settings.fine_tunes_loaded,
                                        in_use_s=settings.request_timeout_s)
        from tunesmith.serve.api.routes_embeddings import ENCODER_NAMES

        for name, target in settings.model_aliases.items():
            if target not in ENCODER_NAMES and target not in (settings.embedding_models or {}):
                app.state.engine.add_alias(name, target)  # an encoder alias is read by /v1/embeddings
        watcher = asyncio.ensure_future(watch_adapters(app)) if settings.engine == "vllm" else None
        from tunesmith.serve.evals import resume

        # eval runs a stopped server left (on SQLite, the only server: all of them) run again from their rows, and
        # every third of a lease those a dead replica left
        await resume.resume_abandoned(app, everyone=app.state.store.db.kind == "sqlite")
        runs_watcher = asyncio.ensure_future(resume.watch(app))
        app.state.batch_runner.start()
        shared = app.state.limiter.shared
        if shared is not None:
            shared.start()
        sweeper = start_sweeper(app)  # expired uploads, their parts and expired files deleted every quotas.sweep_s
        if getattr(app.state, "freeze_heap", False):  # the server's own process (tunesmith serve), not a test's
            freeze_startup_heap()
        yield
        app.state.batch_runner.stop()
        sweeper.cancel()
        if watcher is not None:
            watcher.cancel()
        runs_watcher.cancel()
        app.state.store.claims.close()
        app.state.engine.close()
        app.state.lanes.close()
        if shared is not None:
            shared.close()

    from tunesmith.serve.store import Store, worker_id
    from tunesmith.serve.store.keys import checked_secret

    docs = settings.docs_on
    app = FastAPI(title="tunesmith", version=_version(), lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url=None, openapi_url="/openapi.json" if docs else None)
    app.state.settings = settings
    app.state.limiter = KeyLimiter(settings.limits_per_key)
    app.state.lanes = Lanes()  # the bounded thread pools every key's off-loop work runs in (tunesmith.serve.lanes)
    from tunesmith.serve.batches.runner import BatchRunner

    app.state.batch_runner = BatchRunner(app, settings.batch_lines_in_flight, settings.batch_chunk_lines)
    from tunesmith.serve.api.body_limit import BodyLimit

    app.add_middleware(BodyLimit, max_body=settings.max_body_mb * 1024 * 1024,
                       max_upload=settings.max_upload_mb * 1024 * 1024)
    app.add_middleware(EdgeLimit, limiter_of=lambda: getattr(app.state, "limiter", None),
                       owner_of=lambda scope: owner_of(app, bearer_of(scope)))
    from tunesmith.serve.api.gate import KeyGate

    app.add_middleware(KeyGate, keys_of=lambda: settings.api_keys)  # runs first: no body of a stranger is read
    app.state.store = Store(settings.data_dir, settings.database)
    checked_secret(app.state.store.db, settings.data_dir, "--database" if settings.database else "the store")
    app.state.replica = worker_id()  # this server among the replicas sharing the store: the holder of its claims
    if app.state.store.db.kind == "postgresql":  # replicas: a key's requests in flight counted over all of them
        from tunesmith.serve.api.shared_limits import SharedPlaces

        app.state.limiter.shared = SharedPlaces(app.state.store, app.state.replica)
    app.state.trainable_models = lambda: {settings.model}

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
        logging.getLogger("tunesmith.serve").warning("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"error": {"message": "The server cannot reach its database for a moment (it may be "
                                       "restarting); nothing of this request was kept. Retry shortly.",
                                       "type": "server_error", "param": None, "code": "store_unavailable"}},
                            status_code=503, headers={"retry-after": "2"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logging.getLogger("tunesmith.serve").exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": {"message": "The server had an error while processing your request.",
                                       "type": "server_error", "param": None, "code": "server_error"}},
                            status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": validation_error_body(exc.errors())}, status_code=400)

    from tunesmith.serve.api import health, routes_embeddings, routes_models, routes_openai, routes_responses, stored_completions
    from tunesmith.serve.batches import routes as routes_batches
    from tunesmith.serve.dashboard import routes as routes_dashboard
    from tunesmith.serve.evals import routes as routes_evals
    from tunesmith.serve.evals import routes_graders
    from tunesmith.serve.jobs import distill as routes_distill
    from tunesmith.serve.jobs import routes as routes_jobs
    from tunesmith.serve.jobs import uploads as routes_uploads

    app.include_router(health.router)
    app.include_router(routes_openai.router)
    app.include_router(stored_completions.router)
    app.include_router(routes_jobs.router)
    app.include_router(routes_uploads.router)
    app.include_router(routes_distill.router)
    app.include_router(routes_batches.router)
    app.include_router(routes_models.router)
    app.include_router(routes_responses.router)
    app.include_router(routes_embeddings.router)
    app.include_router(routes_graders.router)
    app.include_router(routes_evals.router)
    routes_dashboard.mount(app)
    return app


def make_engine(settings: ServeSettings):
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


ADAPTER_WATCH_S = 2.0


async def watch_adapters(app: FastAPI) -> None:
    """Load each new fine-tune into the engine within seconds of its job succeeding (on any replica), so its first
    request does not wait for vLLM's load; later ones are resolved by name at their first request."""
    since = int(time.time())
    while True:
        await asyncio.sleep(ADAPTER_WATCH_S)
        try:
            since = await asyncio.to_thread(app.state.models.preload, since)
        except Exception:  # noqa: BLE001 - a failed load is retried at the model's next request and logged
            logging.getLogger("tunesmith.serve").exception("loading a fine-tune into the engine failed")


def _version() -> str:
    from tunesmith import __version__

    return __version__
