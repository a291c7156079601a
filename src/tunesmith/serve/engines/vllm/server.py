"""A vLLM OpenAI server that tunesmith starts, watches and stops (``tunesmith serve --engine vllm``).

Who can reach it: nobody but tunesmith. Each start gets a fresh private folder (``mkdtemp``: mode 0700, only
this user enters it) holding vLLM's Unix socket (``--uds``), its engine's internal sockets and temporary files,
and a fresh random key passed by environment (``VLLM_API_KEY``, never on a command line: ``ps`` shows none).
vLLM runs behind :class:`tunesmith.serve.engines.vllm.shim.RequireKey`, which refuses every route without the key,
and, where ``unshare`` allows it, in a network namespace of its own (its engine's loopback listeners are
then unreachable from the host). It is ready when the process listening on the socket is the one we started
(``SO_PEERCRED``) and answers ``/v1/models`` with our model: a restart never talks to an address another
process may hold. Its output goes to ``<data dir>/vllm/vllm.log``. A watcher thread restarts it when it dies
and then calls ``on_restart`` (the engine reloads its adapters); requests meanwhile get a 503.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.errors import ConfigError, ModelError
from tunesmith.generation.remote import CompletionsServer, register_engine

log = logging.getLogger("tunesmith.serve")

LOCAL_VENV = Path(".vllm-venv/bin/python")  # what `make vllm` builds
CPU_KVCACHE_GIB = "2"  # VLLM_CPU_KVCACHE_SPACE when the user sets none (vLLM's CPU build needs a size)
START_TIMEOUT_S = 900.0  # first start on 2 CPU cores measured 51-130 s; compiling kernels can take longer
WATCH_EVERY_S = 1.0
SHIM = "tunesmith_vllm_shim"  # vllm_shim.py's name inside the private folder
SOCKET_NAME = "api.sock"


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
    max_model_len: int | str = "auto"  # auto: vLLM fits it in the KV cache budget; read back once it answers
    dtype: str = "auto"
    max_loras: int = 4  # adapters in one batch; more stay in vLLM's CPU cache and swap in
    max_cpu_loras: int = 64
    max_lora_rank: int = 64
    gpu_memory_utilization: float | None = None  # CUDA: vLLM's share of the GPU (the jobs worker has the rest)
    extra_args: tuple[str, ...] = field(default_factory=tuple)  # --vllm-arg: anything else vLLM takes


def vllm_launch(base: str, extra_args: tuple[str, ...] = (), gpu_memory_utilization: float | None = None):
    """The base model's folder and the dtype: float32 on CPUs (what the built-in engine computes in, so greedy
    answers agree), the model's own on GPUs. The context length is vLLM's choice within its KV cache budget."""
    import torch

    from tunesmith.models.names import resolve

    return VllmLaunch(resolve(base), base, "auto", "auto" if torch.cuda.is_available() else "float32",
                      gpu_memory_utilization=gpu_memory_utilization, extra_args=extra_args)


def vllm_command(python: str, launch: VllmLaunch, folder: Path) -> list[str]:
    """vLLM's command line: the shim in ``folder`` runs vLLM's server on ``folder``'s socket. No secret in it:
    the key travels by environment. ``--generation-config vllm``: the model's generation_config.json (a
    repetition penalty, say) is not applied, so answers are the built-in engine's."""
    given = {a.split("=", 1)[0] for a in launch.extra_args if a.startswith("--")}
    ours = {"--max-model-len": str(launch.max_model_len), "--generation-config": "vllm", "--dtype": launch.dtype}
    if launch.gpu_memory_utilization is not None:
        ours["--gpu-memory-utilization"] = f"{launch.gpu_memory_utilization:.4f}"
    chosen = [a for k, v in ours.items() if k not in given for a in (k, v)]
    return [python, str(folder / f"{SHIM}.py"), "--model", launch.model_folder, "--served-model-name",
            launch.served_name, "--uds", str(folder / SOCKET_NAME), "--middleware", f"{SHIM}.RequireKey",
            *chosen, "--enable-lora", "--max-loras", str(launch.max_loras), "--max-cpu-loras", str(launch.max_cpu_loras),
            "--max-lora-rank", str(launch.max_lora_rank), "--disable-uvicorn-access-log", *launch.extra_args]


# the server's own secrets: never handed to vLLM's process (it needs its own key only)
WITHHELD_ENV = ("TUNESMITH_API_KEYS", "OPENAI_API_KEY", "WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def vllm_env(key: str, folder: Path, own_network: bool) -> dict[str, str]:
    """The key, the private folder for vLLM's internal sockets and temporary files, runtime adapter loading
    on, usage statistics off, a KV cache size for the CPU build unless one is set; the server's own secrets
    (``WITHHELD_ENV``) left out."""
    env = {k: v for k, v in os.environ.items() if k not in WITHHELD_ENV}
    env.update(VLLM_API_KEY=key, VLLM_RPC_BASE_PATH=str(folder), TMPDIR=str(folder),
               VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
    if own_network:
        env["TUNESMITH_VLLM_OWN_NETWORK"] = "1"
    return env


@functools.cache
def own_network_prefix() -> tuple[str, ...]:
    """``unshare`` arguments that give vLLM a network namespace of its own, or () where the system refuses
    (no unshare, no user namespaces): vLLM then shares the host's network and its engine's loopback
    listeners are visible on 127.0.0.1 (the API itself is on the private socket either way).
    ``TUNESMITH_VLLM_NETWORK=host`` keeps vLLM on the host's network (a GPU host where namespaces misbehave)."""
    tool = shutil.which("unshare")
    if tool is None or os.environ.get("TUNESMITH_VLLM_NETWORK") == "host":
        return ()
    for flags in ((["--net"] if os.geteuid() == 0 else []), ["--user", "--map-root-user", "--net"]):
        if flags and subprocess.run([tool, *flags, "true"], capture_output=True).returncode == 0:
            return (tool, *flags)
    return ()


def shim_source() -> str:
    return (Path(__file__).with_name("shim.py")).read_text()


@dataclass(frozen=True)
class Endpoint:
    """One start of vLLM: its private folder, Unix socket and key (all fresh each start)."""

    folder: Path
    key: str
    start: int  # 1 for the first start, 2 after the first restart, ...

    @property
    def socket_path(self) -> str:
        return str(self.folder / SOCKET_NAME)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def new_endpoint(start: int) -> Endpoint:
    folder = Path(tempfile.mkdtemp(prefix="tunesmith-vllm-"))  # 0700; short: a socket path has 107 bytes at most
    (folder / f"{SHIM}.py").write_text(shim_source())
    return Endpoint(folder, secrets.token_urlsafe(32), start)


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process listening on the other end of a connected Unix socket (``SO_PEERCRED``)."""
    pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid


def ask_models(path: str, key: str, group: int, timeout: float = 5.0) -> dict | None:
    """vLLM's ``/v1/models`` over the socket at ``path``, asked only once the listener is proven to be a process
    of process group ``group`` (the vLLM we started; the key is never sent to another); None when it is not, or
    does not answer yet."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            if os.getpgid(peer_pid(s)) != group:
                log.error("the process on %s is not the vLLM tunesmith started; not using it", path)
                return None
            s.sendall(f"GET /v1/models HTTP/1.1\r\nHost: vllm\r\nAuthorization: Bearer {key}\r\n"
                      "Connection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return None
    if b"chunked" in head.lower():
        body = dechunk(body)
    try:
        return json.loads(body)
    except ValueError:
        return None


def dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        n = int(size.split(b";")[0] or b"0", 16)
        if n == 0:
            break
        out, body = out + rest[:n], rest[n + 2:]
    return out


class VllmServer:
    """One supervised vLLM process: ``start`` (returns once it answers), restart on death, ``stop``. ``ready``
    is set while it answers (after a restart, once ``on_restart`` has run: it must not raise)."""

    def __init__(self, python: str, launch: VllmLaunch, log_dir: Path, on_restart: Callable[[], None] = lambda: None,
                 start_timeout_s: float = START_TIMEOUT_S):
        self.python, self.launch, self.on_restart = python, launch, on_restart
        self.log_path = Path(log_dir) / "vllm.log"
        self.start_timeout_s = start_timeout_s
        self.endpoint: Endpoint | None = None
        self.max_model_len: int | None = None  # what vLLM chose, read back from /v1/models
        self.ready = threading.Event()
        self.stopping = False
        self.restarts = 0
        self.proc: subprocess.Popen | None = None

    @property
    def headers(self) -> dict[str, str]:
        return self.endpoint.headers

    @property
    def socket_path(self) -> str:
        return self.endpoint.socket_path

    def alive(self) -> bool:
        """Ready and its process running (a vLLM killed a moment ago is not, before the watcher sees it)."""
        return self.ready.is_set() and self.proc is not None and self.proc.poll() is None

    @property
    def endpoint_file(self) -> Path:
        """Where the running vLLM's socket and key are written (mode 0600) for the server's jobs worker."""
        return self.log_path.parent / "endpoint.json"

    def completions(self) -> CompletionsServer:
        """This vLLM as a generation engine (it follows restarts)."""
        return CompletionsServer("http://vllm", locate=lambda: (self.socket_path, self.endpoint.key))

    def _publish(self) -> None:
        fd = os.open(self.endpoint_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"socket": self.socket_path, "key": self.endpoint.key, "model": self.launch.served_name}, fh)

    def start(self) -> None:
        self._spawn()
        self._wait_ready()
        self._publish()
        self.ready.set()
        threading.Thread(target=self._watch, name="tunesmith-vllm-watch", daemon=True).start()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s; the watcher does not restart it."""
        self.stopping = True
        self.ready.clear()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    pass
            self._kill_group()
        self._forget_endpoint()
        self.endpoint_file.unlink(missing_ok=True)

    def processes(self) -> list[int]:
        """The pids of vLLM's process group (its server, engine core and workers)."""
        if self.proc is None:
            return []
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.getpgid(int(entry.name)) == self.proc.pid:
                        pids.append(int(entry.name))
                except OSError:
                    pass
        return pids

    def _kill_group(self) -> None:
        """SIGKILL whatever is left of the server's process group (its engine core processes)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()

    def _forget_endpoint(self) -> None:
        if self.endpoint is not None:
            shutil.rmtree(self.endpoint.folder, ignore_errors=True)

    def _spawn(self) -> None:
        from tunesmith.serve.engines.process import die_with_parent

        self._forget_endpoint()  # the old socket's folder goes: nothing can wait there for our key
        self.endpoint = new_endpoint(1 + self.restarts)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        prefix = own_network_prefix()
        if not prefix and self.restarts == 0 and os.environ.get("TUNESMITH_VLLM_NETWORK") != "host":
            log.warning("vLLM runs on the host's network (unshare refused a namespace of its own): its engine's "
                        "internal listeners are reachable on 127.0.0.1 by local users; its API stays on a private "
                        "socket with a key. Set TUNESMITH_VLLM_NETWORK=host to say this is intended.")
        cmd = [*prefix, *vllm_command(self.python, self.launch, self.endpoint.folder)]
        with open(self.log_path, "ab") as out:
            network = "its own network namespace" if prefix else "the host's network"
            out.write(f"\n--- tunesmith starts vLLM at {time.strftime('%Y-%m-%d %H:%M:%S')} in {network}: "
                      f"{' '.join(cmd)}\n".encode())
            out.flush()
            # its own session: a Ctrl-C in the terminal reaches tunesmith, which stops vLLM in order
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         env=vllm_env(self.endpoint.key, self.endpoint.folder, bool(prefix)),
                                         start_new_session=True, preexec_fn=die_with_parent)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline and not self.stopping:
            if self.proc.poll() is not None:
                self._kill_group()
                raise ModelError(f"vLLM exited with code {self.proc.returncode} while starting; the end of its log "
                                 f"({self.log_path}):\n{self.log_tail()}")
            doc = ask_models(self.socket_path, self.endpoint.key, self.proc.pid)
            served = {m.get("id"): m for m in (doc or {}).get("data", [])}
            if self.launch.served_name in served:
                self.max_model_len = int(served[self.launch.served_name].get("max_model_len") or 0) or None
                return
            time.sleep(1.0)
        self._kill_group()
        raise ModelError(f"vLLM did not answer within {self.start_timeout_s:.0f} s; its log: {self.log_path}")

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
            except Exception:  # noqa: BLE001 - keep trying: the next loop sees the dead process again
                log.exception("vLLM restart failed; trying again")
                continue
            try:
                self.on_restart()
            except Exception:  # noqa: BLE001 - what on_restart could not do is its own to report
                log.exception("after restarting vLLM")
            self._publish()
            self.ready.set()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextmanager
def vllm_completions(base: str, log_dir: Path):
    """tunesmith's vLLM over ``base`` as a generation engine for the block (``eval.engine: vllm``,
    ``synth.engine: vllm``): started, then stopped."""
    server = VllmServer(vllm_python(), vllm_launch(base), log_dir)
    server.start()
    try:
        yield server.completions()
    finally:
        server.stop()


register_engine("vllm", vllm_completions, vllm_available)
