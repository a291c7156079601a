"""Running a python grader's ``grade(sample, item)`` in a separate, limited process.

One process grades a whole batch, one row at a time, so a training step pays one interpreter start, not
one per completion. Each row has its own limits; a row that breaks one gets reward 0 with the reason and
the rows after it go on in a fresh process:

- CPU time (``RLIMIT_CPU``, set per row by the child; the whole process is capped at rows × limit),
- memory (``RLIMIT_AS``: an allocation past it fails with MemoryError inside the grader),
- wall-clock (the sandbox's relay ends the grader when a row takes longer; this process kills the process
  group :data:`RELAY_GRACE_S` later if the relay has not answered),
- written file size (``RLIMIT_FSIZE``) and no core dumps.

Isolation (see :mod:`tunesmith.graders.sandbox_child`), every layer required:

- fresh user, mount, network and PID namespaces through ``unshare`` (no interface but a down loopback; no
  process outside the grader's own to signal or see; every process it starts is killed with it);
- inside them every mount read-only, the grader's folder a tmpfs of ``Limits.folder_mb``, a ``/proc`` of its own,
  and no capability left (a server started as root gives its graders nothing of root's);
- Landlock: files readable only under Python's installation, writable only in the grader's folder, no TCP;
- a seccomp allow list (:mod:`tunesmith.graders.seccomp`): the system calls a Python grader needs and no
  other (no socket, process, thread, signal, ptrace, chmod, chown, xattr, utime, truncate by path, link);
- an audit hook with readable refusals, and an environment with none of the server's variables (API keys).

The grader does not outlive this process: ``unshare`` gets ``PR_SET_PDEATHSIG`` (SIGKILL) before it is executed,
from the thread that then waits on it and kills it, so the thread's end (the caveat of that signal) can only come
after the sandbox's; the relay watches its stdin for this process's end and keeps the wall clock itself, so a
server that is stopped rather than killed leaves no grader running past its limit (the reasons, case by case, are
in :mod:`tunesmith.graders.sandbox_child`).

Where the host cannot give one of these layers python graders are refused with the reason (:func:`refusal`):
the server does not start with them on, and :func:`run_python` raises.

The answers are data, never trusted: the caller's code runs in a process forked by the sandbox's relay,
out of reach of the channel to this server; each line read here is bounded (:data:`LINE_BYTES`), parsed
defensively, must carry the per-row token chosen here, and its reward must be a finite number in [0, 1];
anything else is the row's error and ends the process.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import ConfigError
from tunesmith.graders.sandbox_child import die_with_parent, reward_error

CHILD = Path(__file__).with_name("sandbox_child.py")
SECCOMP = Path(__file__).with_name("seccomp.py")
STARTUP_S = 20.0  # interpreter start and the grader's own imports (numpy, …), before the first row
RELAY_GRACE_S = 5.0  # past the relay's own deadline, this process stops waiting for its answer and kills the group
LINE_BYTES = 16384  # the longest line the server reads from the sandbox (its answers are under 2,100 bytes)


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 10  # CPU seconds per row
    wall_s: float = 30.0  # wall-clock seconds per row
    memory_mb: int = 1024  # address space of the grader process
    file_mb: int = 16  # the largest file it may write in its folder
    folder_mb: int = 64  # all it may write: its folder is a tmpfs of this size


@dataclass
class Outcome:
    reward: float
    error: str | None = None  # "Type: message" when the row failed (reward is then 0)
    seconds: float = 0.0


NAMESPACES = ("-rmn", "--pid", "--fork", "--kill-child")  # user + mount + network + PID; the grader dies with us
NAMESPACED = True  # False only in tests of the inner layers alone (Landlock, seccomp, the audit hook, the relay)


@functools.cache
def namespaces() -> str | None:
    """None when the grader's namespaces can be built here (``unshare -rmn --pid --fork``, then every mount
    read-only, a tmpfs folder, ``/proc`` and no capability: :func:`sandbox_child.isolate_filesystem`, tried in a
    throwaway process); else why not."""
    tool = shutil.which("unshare")
    if tool is None:
        return "the unshare command is missing (util-linux)"
    with tempfile.TemporaryDirectory(prefix="tunesmith-probe-") as folder:
        try:
            done = subprocess.run([tool, *NAMESPACES, sys.executable, "-I", str(CHILD), "--probe"], cwd=folder,
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"the namespace probe did not run: {exc}"
    said = done.stdout.strip() or done.stderr.strip()[-300:] or f"exit status {done.returncode}"
    return None if said == "isolated" else said


@functools.cache
def landlock_abi() -> int:
    """The Landlock ABI version this kernel offers unprivileged processes (0: none)."""
    probe = ("import ctypes; libc = ctypes.CDLL(None); libc.syscall.restype = ctypes.c_long; "
             "print(max(0, libc.syscall(ctypes.c_long(444), None, ctypes.c_long(0), ctypes.c_long(1))))")
    try:
        done = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True, timeout=30)
        return int(done.stdout.strip() or 0)
    except (OSError, subprocess.SubprocessError, ValueError):
        return 0


@functools.cache
def seccomp_refusal() -> str | None:
    """None when a process here can install the grader's seccomp filter and a socket is then refused;
    else why not (tried in a throwaway process: ``python -I seccomp.py``)."""
    try:
        done = subprocess.run([sys.executable, "-I", str(SECCOMP)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"the seccomp probe did not run: {exc}"
    said = done.stdout.strip() or done.stderr.strip()[-300:] or f"exit status {done.returncode}"
    return None if said == "refused" else said


TURN_OFF = "turn them off (`tunesmith serve --no-python-graders`, no python graders in the recipe)"


def refusal() -> str | None:
    """Why python graders may not run on this host, or None: every layer of the sandbox must be there
    (namespaces with a read-only filesystem and a tmpfs folder, Landlock, the seccomp allow list)."""
    if why := namespaces():
        return (f"python graders are refused here: the sandbox's user, mount, network and PID namespaces cannot be "
                f"built ({why}); {TURN_OFF} or run where unprivileged user namespaces are allowed "
                "(kernel.unprivileged_userns_clone=1, or AppArmor's userns restriction lifted for the server)")
    if not landlock_abi():
        return (f"python graders are refused here: this kernel offers no Landlock (Linux 5.13+), which keeps a "
                f"grader from reading the server's files; {TURN_OFF} or run on a newer kernel")
    if why := seccomp_refusal():
        return f"python graders are refused here: {why}; {TURN_OFF} or run on x86_64 or aarch64 Linux with seccomp"
    return None


def isolation() -> str:
    """What keeps a python grader in, in words (said when a server allows python graders); ConfigError
    where python graders are refused (:func:`refusal`)."""
    if why := refusal():
        raise ConfigError(why)
    return (f"user, mount, network and PID namespaces (read-only filesystem, a tmpfs folder, no capabilities), "
            f"Landlock ABI {landlock_abi()}, seccomp allow list, audit hook, rlimits, empty environment")


def _limit(limits: Limits, rows: int):
    server = os.getpid()

    def apply() -> None:
        die_with_parent(server)
        cpu = limits.cpu_s * rows + 2
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        memory = limits.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        size = limits.file_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _env(folder: str) -> dict[str, str]:
    """Nothing from the server's environment: no keys, no paths to its data."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": folder, "TMPDIR": folder,
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class _Child:
    """One grader process and the lines it answers."""

    def __init__(self, folder: str, limits: Limits, rows: int):
        cmd = [sys.executable, "-I", str(CHILD), "--wall-s", f"{limits.wall_s:g}", "--startup-s", f"{STARTUP_S:g}"]
        if NAMESPACED:
            cmd = [shutil.which("unshare") or "unshare", *NAMESPACES, *cmd, "--folder-mb", str(limits.folder_mb)]
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, cwd=folder, env=_env(folder), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, preexec_fn=_limit(limits, rows), start_new_session=True)
        self.buffer = b""

    def read(self, timeout: float) -> dict | None:
        """The next line as a dict, None when the process ended or the time ran out, or {"broken": why} for
        a line that is too long or not a JSON object (the process is then not asked again)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            if len(self.buffer) > LINE_BYTES:
                return {"broken": f"more than {LINE_BYTES} bytes without a line end"}
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            answer = json.loads(line) if len(line) <= LINE_BYTES else None
        except (ValueError, RecursionError):
            answer = None
        return answer if isinstance(answer, dict) else {"broken": "a line that is not an answer"}

    def send(self, row: dict) -> bool:
        try:
            self.proc.stdin.write((json.dumps(row) + "\n").encode())
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def why_dead(self, limits: Limits) -> str:
        """Why the process stopped answering: still running past the wall clock, or ended (killed on a
        limit or crashed; the last lines it wrote say more)."""
        if self.proc.poll() is None:
            return f"TimeoutError: the grader ran past its wall-clock limit of {limits.wall_s:g} s"
        self.stderr.seek(0)
        lines = self.stderr.read()[-2000:].decode(errors="replace").splitlines()
        tail = " ".join(line for line in lines if not line.startswith("unshare:"))[-500:].strip()
        return (f"RuntimeError: the grader process ended without answering (a limit: {limits.cpu_s} s CPU, "
                f"{limits.memory_mb} MiB memory; or a crash)" + (f": {tail}" if tail else ""))

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.stderr.close()


def run_python(source: str, rows: list[tuple[dict, dict]], limits: Limits = Limits()) -> list[Outcome]:
    """``grade(sample, item)`` of ``source`` for every (sample, item) row, in order; never raises for a row
    (ConfigError, before any row, on a host where python graders are refused: :func:`refusal`)."""
    if why := refusal():
        raise ConfigError(why)
    out: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="tunesmith-grader-") as folder:
        Path(folder, "grader.py").write_text(source, encoding="utf-8")
        while len(out) < len(rows):
            out += _run_some(folder, rows[len(out):], limits)
    return out


def outcome(answer: dict, token: str, seconds: float) -> Outcome:
    """The row's outcome from the sandbox's answer, checked as data: the row's own token, a finite reward
    in [0, 1] or an error text; anything else is reward 0 with the reason."""
    seconds = answer.get("seconds") if isinstance(answer.get("seconds"), float) else seconds
    if "broken" in answer or answer.get("token") != token:
        why = answer.get("broken") or "an answer without this row's token"
        return Outcome(0.0, f"RuntimeError: the grader's sandbox wrote {why}; the process was ended", seconds)
    if isinstance(answer.get("error"), str):
        return Outcome(0.0, answer["error"][:2000], seconds)
    reward = answer.get("reward")
    if problem := reward_error(reward):
        return Outcome(0.0, problem, seconds)
    return Outcome(float(reward), None, seconds)


def _run_some(folder: str, rows: list[tuple[dict, dict]], limits: Limits) -> list[Outcome]:
    """Grade rows in one process until they are done or one kills it (that row gets the reason)."""
    child = _Child(folder, limits, len(rows))
    done: list[Outcome] = []
    try:
        first = child.read(STARTUP_S + RELAY_GRACE_S)
        if first is None or first.get("ready") is not True:
            reason = first.get("fatal") if first else None
            reason = reason[:2000] if isinstance(reason, str) else child.why_dead(limits)
            return [Outcome(0.0, reason) for _ in rows]
        for sample, item in rows:
            start, token = time.perf_counter(), secrets.token_hex(16)
            answer = child.read(limits.wall_s + RELAY_GRACE_S) if child.send(
                {"token": token, "sample": sample, "item": item, "cpu_s": limits.cpu_s}) else None
            if answer is not None and isinstance(answer.get("ended"), str):  # the relay's: it waited too long for us
                return [*done, Outcome(0.0, answer["ended"][:2000], time.perf_counter() - start)]
            if answer is None:
                time.sleep(0.05)  # let a process killed by the kernel be reaped, to name the limit
                return [*done, Outcome(0.0, child.why_dead(limits), time.perf_counter() - start)]
            done.append(outcome(answer, token, time.perf_counter() - start))
            if answer.get("restart") or "broken" in answer or answer.get("token") != token:
                return done  # the process ends after this row: its CPU time ran out, or its channel broke
        return done
    finally:
        child.close()
