"""Generation on a completions server (vLLM) instead of in this process: ``eval.engine`` / ``synth.engine`` and
a job's evaluation on `tunesmith serve --engine vllm`.

A :class:`RemoteModel` stands for a model wherever :func:`tunesmith.generation.complete` takes one: the prompts
(token ids, rendered here exactly as for the built-in engine) go to the server's ``/v1/completions`` under the
model's served name, each row with its own settings and seed, several at once. Whatever else a caller does with a
model (label log-likelihoods, answer losses) loads the model here on first use, so scores that do not come from
generation are the built-in engine's own.

Engines by name: ``builtin`` (None: generate in this process), an ``http(s)://`` URL (an OpenAI-compatible server
taking token-id prompts, its key in ``$TUNESMITH_ENGINE_API_KEY``), a name registered with
:func:`register_engine` (``vllm``: a vLLM server tunesmith starts, registered by :mod:`tunesmith.serve`), or
``auto``: builtin or vllm for the use, by the device's measurement (:mod:`tunesmith.machine.engines`). A server
already running (a job's, on tunesmith serve's vLLM) is offered to a block (:func:`offering`) and used by the
uses that pick vLLM, or put in use for all of them (:func:`using`).
"""

from __future__ import annotations

import functools
import json
import os
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.errors import ConfigError, ModelError
from tunesmith.generation.batch import Generated, Prompt
from tunesmith.generation.sampling import cut_at_stop

ENGINE_KEY_ENV = "TUNESMITH_ENGINE_API_KEY"
ENGINES: dict[str, Callable] = {}  # name -> (base model, log folder) -> context manager yielding a CompletionsServer
ENGINE_AVAILABLE: dict[str, Callable[[], bool]] = {}  # name -> whether it can start here


@dataclass
class CompletionsServer:
    """An OpenAI-compatible server whose ``/v1/completions`` takes token ids and whose
    ``/v1/load_lora_adapter`` loads adapters at run time (vLLM): at ``url``, or over the Unix socket ``uds``."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    uds: str | None = None
    concurrency: int = 16
    timeout_s: float = 900.0
    locate: Callable[[], tuple[str, str]] | None = None  # (socket, key) now: a vLLM that restarts moves

    @classmethod
    def from_file(cls, path: Path) -> CompletionsServer:
        """The server an endpoint file describes (``tunesmith serve``'s vLLM, for its jobs worker; private to the
        server's user), read again at each use."""
        def locate() -> tuple[str, str]:
            doc = json.loads(Path(path).read_text())
            return doc["socket"], doc["key"]

        return cls("http://vllm", locate=locate)

    def client(self):
        import httpx2 as httpx

        uds, headers = self.uds, self.headers
        if self.locate is not None:
            uds, key = self.locate()
            headers = {"Authorization": f"Bearer {key}"}
        transport = httpx.HTTPTransport(uds=uds) if uds else None
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        return httpx.Client(transport=transport, headers=headers, timeout=self.timeout_s, limits=limits)

    def post(self, route: str, body: dict) -> dict | str:
        with self.client() as c:
            return self._post(c, route, body)

    def _post(self, client, route: str, body: dict):
        import httpx2 as httpx

        try:
            r = client.post(f"{self.url.rstrip('/')}{route}", json=body)
        except httpx.HTTPError as exc:
            raise ModelError(f"the generation engine at {self.url} did not answer {route}: {exc}") from None
        if r.status_code != 200:
            raise ModelError(f"the generation engine refused {route} ({r.status_code}): {r.text[:500]}")
        try:
            return r.json()
        except ValueError:
            return r.text

    def load_adapter(self, path: str | Path) -> str:
        """Load a LoRA adapter folder; returns the name it is served under (unique to this load)."""
        name = f"tunesmith-{uuid.uuid4().hex[:12]}"
        self.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(Path(path).resolve())})
        return name

    def unload_adapter(self, name: str) -> None:
        self.post("/v1/unload_lora_adapter", {"lora_name": name})

    def base_name(self) -> str:
        """The name the server serves its base model under (the first it lists, as vLLM does)."""
        return self.served_models()[0]

    def served_models(self) -> list[str]:
        import httpx2 as httpx

        with self.client() as c:
            try:
                return [m["id"] for m in c.get(f"{self.url.rstrip('/')}/v1/models").json()["data"]]
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                raise ModelError(f"the generation engine at {self.url} did not list its models: {exc}") from None

    def complete(self, name: str, prompts: Sequence[Prompt], on_done: Callable[[int, Generated], None]) -> list[Generated]:
        """Every prompt's completions (its ``n`` rows, choice ``j`` seeded ``seed + j``), ``on_done`` as each ends."""
        out: list[Generated | None] = [None] * len(prompts)
        with self.client() as c, ThreadPoolExecutor(self.concurrency) as pool:
            def one(i: int) -> Generated:
                rows = [self._row(c, name, prompts[i], j) for j in range(prompts[i].n)]
                return Generated([t for t, _, _ in rows], len(prompts[i].ids), sum(n for _, n, _ in rows),
                                 [ids for _, _, ids in rows])

            order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].ids))  # longest first, as locally
            futures = {pool.submit(one, i): i for i in order}
            for future in as_completed(futures):  # on_done runs in the caller's thread (caches, progress bars)
                i = futures[future]
                out[i] = future.result()
                on_done(i, out[i])
        return out  # type: ignore[return-value]

    def _row(self, client, name: str, prompt: Prompt, j: int) -> tuple[str, int, list[int]]:
        """Choice ``j`` of ``prompt``: its text cut at a stop string, its token count and ids."""
        p = prompt.params
        body = {"model": name if prompt.adapter is None else prompt.adapter, "prompt": prompt.ids,
                "max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p, "stop": list(p.stop),
                "return_token_ids": True}
        if p.seed is not None:
            body["seed"] = p.seed + j  # as the built-in engine draws choice j
        if isinstance(prompt.constraint, RemoteSchema):
            body["structured_outputs"] = {"json": prompt.constraint.schema}
        elif prompt.constraint is not None:
            raise ConfigError("a local decoding constraint cannot run on a remote engine; pass a RemoteSchema")
        choice = self._post(client, "/v1/completions", body)["choices"][0]
        ids = list(choice.get("token_ids") or [])
        return cut_at_stop(choice.get("text") or "", p.stop), len(ids), ids


@dataclass(frozen=True)
class RemoteSchema:
    """A JSON schema every row of a prompt decodes under, on the server (vLLM's structured outputs)."""

    schema: dict


class RemoteModel:
    """A model answered by a :class:`CompletionsServer` for generation; anything else a caller asks of a model
    (calling it, its parameters, its config) loads it here on first use with ``load``."""

    remote = True  # what tunesmith.generation.complete looks for

    def __init__(self, server: CompletionsServer, name: str, load: Callable[[], object]):
        self.server, self.served_name, self._load = server, name, load

    @functools.cached_property
    def local(self):
        return self._load()

    def complete(self, prompts: Sequence[Prompt], on_done: Callable[[int, Generated], None]) -> list[Generated]:
        return self.server.complete(self.served_name, prompts, on_done)

    def __getattr__(self, attr: str):  # only for what this class does not have: the local model's
        if attr.startswith("__") or attr in ("server", "served_name", "_load"):
            raise AttributeError(attr)
        return getattr(self.local, attr)

    def __call__(self, *args, **kwargs):
        return self.local(*args, **kwargs)


class _Pending:
    """An engine named for a block, started only if something in it generates (a run whose contenders were all
    scored before starts no vLLM)."""

    def __init__(self, spec: str, base_model: str, log_dir: Path, stack: ExitStack):
        self.spec, self.base_model, self.log_dir, self.stack = spec, base_model, log_dir, stack
        self.server: CompletionsServer | None = None

    def get(self) -> CompletionsServer | None:
        if self.server is None:
            self.server = self.stack.enter_context(generation_engine(self.spec, self.base_model, self.log_dir))
        return self.server


_ACTIVE: ContextVar[CompletionsServer | _Pending | None] = ContextVar("tunesmith_generation_engine", default=None)
_OFFERED: ContextVar[CompletionsServer | None] = ContextVar("tunesmith_offered_engine", default=None)


def active() -> CompletionsServer | None:
    """The engine generation in this context goes to (None: this process)."""
    current = _ACTIVE.get()
    return current.get() if isinstance(current, _Pending) else current


def offered() -> CompletionsServer | None:
    """A running engine offered to the block (:func:`offering`), whether or not a use picked it."""
    return _OFFERED.get()


@contextmanager
def offering(server: CompletionsServer):
    """``server`` runs already (a job's, on tunesmith serve's vLLM): a use that picks vLLM in the block
    generates there instead of starting its own; one that picks the built-in engine generates in this process."""
    token = _OFFERED.set(server)
    try:
        yield
    finally:
        _OFFERED.reset(token)


def pick(spec: str, use: str, device: str = "auto", say: Callable[[str], None] | None = None) -> str:
    """``spec`` with ``auto`` resolved for ``use`` (eval, synth or rollouts) on ``device``: the engine its
    device's measurement found faster (:func:`tunesmith.machine.engines.choose`), said through ``say``."""
    if spec != "auto":
        return spec
    from tunesmith.machine import engines

    available = offered() is not None or ENGINE_AVAILABLE.get("vllm", lambda: False)()
    choice = engines.choose(use, engines.device_kind(device), available)
    if say is not None:
        say(f"{use} generates on the {choice.engine} engine: {choice.reason}")
    return choice.engine


def engine_for(use: str, device: str = "auto") -> CompletionsServer | None:
    """The engine ``use`` generates on here: the one in use, else a running one offered when ``auto`` picks
    vLLM for ``use`` on this device (None: this process)."""
    current = active()
    if current is not None or offered() is None:
        return current
    return offered() if pick("auto", use, device) == "vllm" else None


@contextmanager
def using(server: CompletionsServer | None = None, spec: str = "builtin", base_model: str = "", log_dir: Path = Path("."),
          use: str = "eval", device: str = "auto", say: Callable[[str], None] | None = None):
    """Generation in the block goes to ``server``, or to the engine ``spec`` names (``auto``: picked for ``use``
    by measurement; vllm: the offered one if any, else started when first needed); an engine already in use
    (a job's, on tunesmith serve's vLLM) is kept."""
    if _ACTIVE.get() is not None:
        yield
        return
    if server is None:
        spec = pick(spec, use, device, say)
        server = offered() if spec == "vllm" else None
    if server is None and spec == "builtin":
        yield
        return
    with ExitStack() as stack:
        token = _ACTIVE.set(server if server is not None else _Pending(spec, base_model, log_dir, stack))
        try:
            yield
        finally:
            _ACTIVE.reset(token)


def register_engine(name: str, start: Callable, available: Callable[[], bool] = lambda: True) -> None:
    """``start(base_model, log_dir)``: a context manager yielding a :class:`CompletionsServer` for ``base_model``;
    ``available()``: whether it can start here."""
    ENGINES[name] = start
    ENGINE_AVAILABLE[name] = available


@contextmanager
def generation_engine(spec: str, base_model: str, log_dir: Path):
    """The engine ``spec`` names, for the time of the block: None for ``builtin``."""
    if spec == "builtin":
        yield None
    elif spec.startswith(("http://", "https://")):
        key = os.environ.get(ENGINE_KEY_ENV)
        yield CompletionsServer(spec.rstrip("/").removesuffix("/v1"), {"Authorization": f"Bearer {key}"} if key else {})
    elif spec in ENGINES:
        with ENGINES[spec](base_model, log_dir) as server:
            yield server
    else:
        raise ConfigError(f"engine '{spec}' is not known here: builtin, vllm (tunesmith's vLLM, `make vllm`) or an "
                          "http(s):// URL of a vLLM-compatible server")


@contextmanager
def served(server: CompletionsServer | None, adapter: str | Path | None, load: Callable[[], object]):
    """The model to generate with: ``load()``'s model in this process when ``server`` is None or ``adapter`` is
    not a LoRA adapter (a merged or fully fine-tuned folder), else a :class:`RemoteModel` of the server's base
    model or of ``adapter`` loaded there for the block."""
    if server is None or (adapter is not None and not (Path(adapter) / "adapter_config.json").is_file()):
        yield load()
        return
    name = server.load_adapter(adapter) if adapter is not None else server.base_name()
    try:
        yield RemoteModel(server, name, load)
    finally:
        if adapter is not None:
            server.unload_adapter(name)
