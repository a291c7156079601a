"""FastAPI app factory. Nothing heavy happens at import: the model loads when the app starts."""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI

from tunesmith.graders.sandbox import Limits
from tunesmith.serve.api.rate_limits import KeyLimits
from tunesmith.serve.lanes import Lanes
from tunesmith.serve.store.quotas import Quotas


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
    # the Tinker API: several keys' forward_backward calls waiting together run as one pass over the base while they
    # fit one (tunesmith.serve.tinker.stacked; measured faster than one after another, docs/benchmarks.md); off: each
    # call takes its turn alone
    tinker_fused_steps: bool = True
    # the Tinker API with replicas: a run's state saved on its own after an optim_step this often (seconds), what
    # another replica resumes from should its holder stop (tunesmith.serve.tinker.commands)
    tinker_autosave_s: float = 60.0

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


def rooms() -> tuple:
    """The server's rooms, in the order they are set up and started (stopped in the reverse order): the store first
    (every other room reads it), then inference (the engine, the limits, the middlewares), then the rooms of work."""
    from tunesmith.serve.api.room import ROOM as API
    from tunesmith.serve.batches.room import ROOM as BATCHES
    from tunesmith.serve.dashboard.room import ROOM as DASHBOARD
    from tunesmith.serve.evals.room import ROOM as EVALS
    from tunesmith.serve.jobs.room import ROOM as JOBS
    from tunesmith.serve.store.room import ROOM as STORE
    from tunesmith.serve.tinker.room import ROOM as TINKER

    return STORE, API, JOBS, BATCHES, EVALS, TINKER, DASHBOARD


def create_app(settings: ServeSettings | None = None, engine=None) -> FastAPI:
    """Build the app from its rooms; ``engine`` may be injected (tests), otherwise it is created at startup."""
    from tunesmith.serve import room

    settings = settings or ServeSettings()
    if engine is None and not settings.allow_random_model:
        from tunesmith.models.random_weights import refuse_random

        refuse_random(settings.model, "serve", "--allow-random-model")
    parts = rooms()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        stops = await room.start(app, parts)
        if getattr(app.state, "freeze_heap", False):  # the server's own process (tunesmith serve), not a test's
            freeze_startup_heap()
        yield
        for stop in stops:
            stop()
        app.state.lanes.close()

    docs = settings.docs_on
    app = FastAPI(title="tunesmith", version=_version(), lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url=None, openapi_url="/openapi.json" if docs else None)
    app.state.settings, app.state.injected_engine = settings, engine
    app.state.lanes = Lanes()  # the bounded thread pools every key's off-loop work runs in (tunesmith.serve.lanes)
    room.install(app, parts)
    return app


def _version() -> str:
    from tunesmith import __version__

    return __version__
