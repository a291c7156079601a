"""Start the server (with its jobs worker); parse the serve command's options."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tunesmith.errors import ConfigError
from tunesmith.serve.engines.process import die_with_parent
from tunesmith.serve.store.database import DATABASE_ENV


def parse_adapters(items: list[str]) -> dict[str, str]:
    adapters = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter expects NAME=PATH, got '{item}'")
        from tunesmith.serve.engines.heads import is_head_folder

        if not (Path(path) / "adapter_config.json").is_file() and not is_head_folder(path):
            raise ConfigError(f"--adapter {name}: {path} is neither a PEFT adapter folder (adapter_config.json) "
                              "nor a trained head (head.json)")
        adapters[name] = path
    return adapters


def parse_model_aliases(items: list[str], served: set[str]) -> dict[str, str]:
    """``NAME=MODEL`` pairs: requests (and fine-tuning jobs) naming NAME use MODEL, which must be served here
    (the base model, an --adapter name, or an embedding encoder)."""
    from tunesmith.serve.api.routes_embeddings import ENCODER_NAMES

    aliases = {}
    for item in items:
        name, sep, target = item.partition("=")
        if not sep or not name or not target:
            raise ConfigError(f"--model-alias expects NAME=MODEL (e.g. gpt-4o-mini-2024-07-18=smollm2-135m-instruct), "
                              f"got '{item}'")
        if target not in served and target not in ENCODER_NAMES:
            raise ConfigError(f"--model-alias {item}: {target} is not served here; name the --model, an --adapter "
                              f"name or an embedding model ({', '.join(sorted({n for n, _ in ENCODER_NAMES.values()}))})")
        aliases[name] = target
    return aliases


def pick_engine(engine: str, vllm_python: str | None = None) -> str:
    """``auto``: vLLM on a CUDA GPU when it is installed, else the built-in engine (nothing to install); ``vllm``
    when vLLM is not installed is an error saying how to install it, before anything starts."""
    from tunesmith.serve.engines.vllm.server import vllm_available
    from tunesmith.serve.engines.vllm.server import vllm_python as find_vllm

    if engine == "vllm":
        find_vllm(vllm_python)
    if engine in ("builtin", "vllm"):
        return engine
    if engine != "auto":
        raise ConfigError(f"--engine is auto, builtin or vllm, got '{engine}'")
    import torch

    return "vllm" if torch.cuda.is_available() and vllm_available(vllm_python) else "builtin"


def start_worker(data_dir: Path, jobs_per_key: int = 1, executor: str = "local", ray_address: str | None = None,
                 gpu_budget_gb: float | None = None, vllm_endpoint: Path | None = None,
                 jobs_engine: str = "auto", database: str | None = None) -> subprocess.Popen:
    """The jobs worker process: runs jobs itself (local) or hands them to a Ray cluster (ray). ``database`` (the
    store's PostgreSQL URL) goes by environment, never on a command line that ``ps`` shows."""
    module = "tunesmith.serve.jobs.ray_executor" if executor == "ray" else "tunesmith.serve.jobs.worker"
    cmd = [sys.executable, "-m", module, "--data-dir", str(data_dir), "--jobs-per-key", str(jobs_per_key)]
    if gpu_budget_gb is not None and executor == "local":  # a Ray cluster's jobs run on their own GPUs
        cmd += ["--gpu-budget-gb", f"{gpu_budget_gb:.2f}"]
    if vllm_endpoint is not None and executor == "local":  # a path, not a secret: the file is the user's only
        cmd += ["--vllm-endpoint", str(vllm_endpoint), "--jobs-engine", jobs_engine]
    env = {**os.environ, DATABASE_ENV: database} if database else {
        k: v for k, v in os.environ.items() if k != DATABASE_ENV}
    return subprocess.Popen(cmd + (["--ray-address", ray_address] if ray_address else []),
                            preexec_fn=die_with_parent, env=env)


SHUTDOWN_GRACE_S = 5  # after SIGTERM: requests still in flight get a 503 and the server is gone within this
WORKER_STOP_S = 30  # the jobs worker saves a checkpoint at its next step; killed if it takes longer


def serve_platform(settings, host: str, port: int, say=print, jobs_per_key: int = 1, executor: str = "local",
                  ray_address: str | None = None, jobs_engine: str = "auto") -> None:
    if settings.python_graders_on:  # a host that cannot sandbox them is refused here, before anything starts
        from tunesmith.graders.sandbox import isolation

        say(f"python graders: on, each in a sandbox ({isolation()})")
    import uvicorn

    from tunesmith.serve.app import create_app

    split = share_the_gpu(settings)
    app = create_app(settings)
    app.state.freeze_heap = True  # this process is the server's alone (app.freeze_startup_heap)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            """On SIGTERM/SIGINT stop generating at once: requests in flight are answered with a 503, batches stop
            first (their lines cut short stay unanswered, for the next holder of the batch)."""
            app.state.batch_runner.stopping = True  # a flag: this runs in a signal handler, not a task of the loop
            engine = getattr(app.state, "engine", None)
            if engine is not None:
                engine.close()
            worker.terminate()  # the worker saves its job at the next step while the server drains
            super().handle_exit(sig, frame)

    endpoint = settings.vllm_dir / "endpoint.json" if settings.engine == "vllm" else None
    worker = start_worker(settings.data_dir, jobs_per_key, executor, ray_address, split and split.jobs_gb, endpoint,
                          jobs_engine, settings.database)
    # uvicorn re-raises the signal it handled once it has stopped; a no-op handler lets the worker be awaited
    signal.signal(signal.SIGTERM, lambda *_: None)
    say(f"tunesmith serving {settings.model} (+{len(settings.adapters)} adapter(s)) on the {settings.engine} engine "
        f"at http://{host}:{port}/v1 "
        f"— dashboard at http://{host}:{port}/ — jobs worker pid {worker.pid}")
    if split is not None:
        say(split.describe())
    try:
        _Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                               timeout_graceful_shutdown=SHUTDOWN_GRACE_S)).run()
    finally:
        stop_worker(worker)


def share_the_gpu(settings):
    """With vLLM on a CUDA GPU: its share and the jobs' (:mod:`tunesmith.serve.engines.gpu_split`), set in ``settings``."""
    from tunesmith.serve.engines.gpu_split import cuda_total, plan_split

    if settings.engine != "vllm":
        return None
    settings.gpu_split = plan_split(cuda_total(), settings.vllm_gpu_share)
    return settings.gpu_split


def stop_worker(worker: subprocess.Popen) -> None:
    """SIGTERM: the worker stops its job at the next step with a checkpoint; SIGKILL if it takes too long
    (the job then resumes from its previous checkpoint)."""
    worker.terminate()
    try:
        worker.wait(WORKER_STOP_S)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def serve_in_thread(app, log_level: str = "warning"):
    """Serve ``app`` with uvicorn in a daemon thread on a free 127.0.0.1 port (tests, benchmarks, screenshots);
    returns the uvicorn server, once it has started, and ``http://127.0.0.1:PORT``. Set ``should_exit`` to stop it."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level))
    server.thread = threading.Thread(target=server.run, daemon=True)
    server.thread.start()
    while not server.started:
        if not server.thread.is_alive():  # its startup failed (logged above): say so, never wait forever
            raise RuntimeError(f"the server on port {port} stopped before it started; its log says why")
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"
