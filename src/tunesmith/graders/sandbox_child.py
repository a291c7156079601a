"""The processes a python grader runs in (started by :mod:`tunesmith.graders.sandbox` as ``python -I <this file>``
inside its own folder, in fresh user, mount, network and PID namespaces; it imports nothing from tunesmith).

Before the grader's source is even compiled this process (0) makes every mount it sees read-only (one recursive
``mount_setattr``: no file of the host can change, whatever its owner or mode), puts a size-capped tmpfs on the
grader's folder (the only place it can write, ``--folder-mb`` in all), mounts a ``/proc`` of its own PID namespace
and drops every capability (bounding set, ambient, effective, permitted: the namespace's root can do nothing a
plain user cannot); (1) restricts itself with Landlock, the kernel's
unprivileged sandbox: files may be read only under Python's own installation, written only in the grader's
folder, and no TCP connection or bind is allowed; (2) forks the **grader process**, which adds a second,
nested Landlock layer (so it can neither trace, signal nor read ``/proc`` of this one), closes every
descriptor of the server's channel, installs the seccomp filter of :mod:`tunesmith.graders.seccomp` (no
socket system call for any address family, no new process or thread) and an audit hook refusing sockets,
new processes and opening files outside those folders, and only then runs the caller's code.

This process, the **relay**, stays out of the caller's reach: it passes each row to the grader over one
pipe and reads the grader's answer from another, at most :data:`ANSWER_BYTES` bytes, parses it as data
(a finite reward in [0, 1], or an error), times it itself, and answers the server on the original stdout
with the server's per-row token. Whatever the grader writes, on any descriptor it has, can only become its
own row's error; a grader that breaks the protocol is ended and the next rows go on in a fresh process.

**The grader never outlives its server.** Three things end it, each for a case the others miss:

- the relay keeps the wall clock itself (``--wall-s`` per row, ``--startup-s`` for loading the source, ``--wall-s``
  again for the server's next row): past it the grader is killed, the server told why, and the relay exits. This
  is what ends a grader whose server is alive but does not act (stopped with SIGSTOP, or stalled), which no
  signal of a process's death reports;
- while it waits the relay watches its stdin, the pipe the server writes rows to: when the server's process
  ends, its end of the pipe closes (the relay sees ``POLLHUP``) and the grader is killed at once. The pipe says
  "the process that talks to me is gone" whichever thread started the sandbox, but it stays open while any
  other process holds its write end (a child the server forked without executing anything);
- ``PR_SET_PDEATHSIG`` (SIGKILL) on ``unshare`` (set by the server before it executes it), on this relay
  (``unshare --kill-child``) and on the grader process (set here after the fork; it matters where the sandbox
  runs without namespaces, in tests of the inner layers): a SIGKILLed server takes the whole chain down at
  once, whoever else holds its pipes. Its caveat, that it fires when the *thread* that forked ends, not the
  process, is harmless here: the server thread that starts the sandbox is the one that waits on it and kills
  it, and the relay is single-threaded. Once the relay, PID 1 of the grader's PID namespace, is gone the
  kernel kills every process left in that namespace, so nothing the grader does to its own setting counts.

A process group (the server starts the sandbox in a session of its own and kills the group when it is done with
it) needs a living server to send the signal, so it covers none of these cases alone.
"""

import ctypes
import importlib.util
import json
import math
import os
import resource
import select
import signal
import sys
import time

READ = 1 | 4 | 8  # Landlock: execute, read file, read directory
FILE_RW = 2 | 4  # write file, read file (rules on single files such as /dev/null)
BLOCKED_EVENTS = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                  "os.kill", "os.killpg", "pty.spawn", "os.chroot", "sys.remote_exec")
ANSWER_BYTES = 8192  # the longest answer line the relay reads from the grader (errors are cut to 2,000 characters)
PR_SET_PDEATHSIG, PR_SET_DUMPABLE = 1, 4
SERVER = 0  # the relay's stdin: the server's rows, and the end of the server when it closes


class ServerGone(Exception):
    """The server's end of the relay's stdin closed: the server process ended."""


PRCTL = ctypes.CDLL(None).prctl  # looked up before any fork: a forked child of a threaded server may not dlopen


def die_with_parent(parent: int) -> None:
    """In a process just forked by ``parent``: SIGKILL when the thread that forked it ends; exit now if that
    already happened (the signal would never come)."""
    PRCTL(PR_SET_PDEATHSIG, _long(signal.SIGKILL), _long(0), _long(0), _long(0))
    if os.getppid() != parent:
        os._exit(1)


def wait_for(fd: int, deadline: float, event: int = select.POLLIN) -> None:
    """Until ``fd`` is readable (or at its end), or writable for ``event`` POLLOUT; TimeoutError at ``deadline``
    (``time.monotonic``), ServerGone as soon as the server's end of :data:`SERVER` closes."""
    poll = select.poll()
    poll.register(SERVER, select.POLLIN if fd == SERVER else 0)  # 0: only its hang-up (or an error) is reported
    if fd != SERVER:
        poll.register(fd, event)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        events = dict(poll.poll(math.ceil(left * 1000)))
        if fd in events:
            return
        if events.get(SERVER):
            raise ServerGone


def _long(v):
    return ctypes.c_long(v)


def landlock(read_dirs, write_dirs, files) -> int:
    """Restrict this process (and any child) to the given folders; returns the Landlock ABI used, 0 if none."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(_long(444), None, _long(0), _long(1))  # landlock_create_ruleset(..., VERSION)
    if abi < 1:
        return 0
    fs = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0) | (1 << 15 if abi >= 5 else 0)

    class Attr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    attr = Attr(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)  # net: bind + connect TCP; scoped: unix, signals
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    ruleset = libc.syscall(_long(444), ctypes.byref(attr), _long(size), _long(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    rules = [(d, READ) for d in read_dirs] + [(d, fs) for d in write_dirs] + [(f, FILE_RW) for f in files]
    for path, access in rules:
        if not os.path.exists(path):
            continue
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = PathBeneath(access & fs, fd)
        if libc.syscall(_long(445), _long(ruleset), _long(1), ctypes.byref(rule), _long(0)) < 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule failed for {path}")
        os.close(fd)
    if libc.prctl(38, _long(1), _long(0), _long(0), _long(0)) < 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if libc.syscall(_long(446), _long(ruleset), _long(0)) < 0:  # landlock_restrict_self
        raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    os.close(ruleset)
    return abi


MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 0x4000, 1 << 18
MOUNT_ATTR_RDONLY, AT_FDCWD, AT_RECURSIVE, MOUNT_SETATTR = 1, -100, 0x8000, 442  # 442 on x86_64 and aarch64


def isolate_filesystem(folder: str, folder_mb: int) -> None:
    """In this process's own mount namespace: every mount read-only, a tmpfs of ``folder_mb`` on ``folder`` (its
    files carried over), ``/proc`` of this PID namespace, then no capability left. OSError saying which step
    failed."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def check(result, what):
        if result < 0:
            raise OSError(ctypes.get_errno(), f"{what} failed: {os.strerror(ctypes.get_errno())}")

    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                    ("userns_fd", ctypes.c_uint64)]

    kept = {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)
            if os.path.isfile(os.path.join(folder, name))}
    check(libc.mount(None, b"/", None, _long(MS_REC | MS_PRIVATE), None), "making the mounts private")
    attr = MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    check(libc.syscall(_long(MOUNT_SETATTR), _long(AT_FDCWD), b"/", _long(AT_RECURSIVE), ctypes.byref(attr),
                       _long(ctypes.sizeof(attr))), "making every mount read-only (mount_setattr, Linux 5.12+)")
    check(libc.mount(b"tmpfs", os.fsencode(folder), b"tmpfs", _long(MS_NOSUID | MS_NODEV),
                     f"size={folder_mb}m,mode=0700".encode()), "mounting the grader's tmpfs")
    check(libc.mount(b"proc", b"/proc", b"proc", _long(MS_NOSUID | MS_NODEV | MS_NOEXEC), None), "mounting /proc")
    os.chdir(folder)  # the tmpfs, not the folder beneath it
    for name, data in kept.items():
        with open(name, "wb") as f:
            f.write(data)
    drop_capabilities(libc)


def drop_capabilities(libc) -> None:
    """No capability left in any set, and none to regain (bounding set emptied, ambient cleared)."""
    for cap in range(64):
        libc.prctl(24, _long(cap), _long(0), _long(0), _long(0))  # PR_CAPBSET_DROP (EINVAL past the last: fine)
    libc.prctl(47, _long(4), _long(0), _long(0), _long(0))  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    if libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()) < 0:  # _LINUX_CAPABILITY_VERSION_3
        raise OSError(ctypes.get_errno(), "dropping the capabilities failed")


def sibling(name: str):
    """The module ``name`` beside this file, loaded by path (this process imports nothing from tunesmith)."""
    spec = importlib.util.spec_from_file_location(f"tunesmith_sandbox_{name}",
                                                  os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def audit_hook(folder, read_roots):
    def inside(path, roots):
        real = os.path.realpath(path)
        return any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots)

    def hook(event, args):
        if event.startswith("socket."):
            raise PermissionError("a python grader may not use the network")
        if event.startswith(BLOCKED_EVENTS):
            raise PermissionError(f"a python grader may not do this ({event})")
        if event == "open" and isinstance(args[0], str | bytes):
            path = os.fsdecode(args[0])
            writing = isinstance(args[1], str) and any(c in args[1] for c in "wax+")
            writing = writing or (isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if not inside(path, [folder]) and (writing or not inside(path, read_roots)):
                raise PermissionError(f"a python grader may open files in its own folder only, not {path}")

    sys.addaudithook(hook)


def on_cpu_limit(out, cpu_s):
    """SIGXCPU (the row's CPU time is spent): answer the row with the reason and end this process."""

    def handler(signum, frame):
        out.write(json.dumps({"error": f"TimeoutError: the grader ran past its CPU-time limit of {cpu_s} s",
                              "restart": True}) + "\n")
        out.flush()
        os._exit(0)

    return handler


def grade_rows(grade, rows, out) -> None:
    """In the grader process: one JSON line in, one out: {"reward": x} or {"error": "Type: message"}; stops at
    the end of its input."""
    for line in rows:
        row = json.loads(line)
        signal.signal(signal.SIGXCPU, on_cpu_limit(out, row["cpu_s"]))
        soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
        used = resource.getrusage(resource.RUSAGE_SELF).ru_utime + resource.getrusage(resource.RUSAGE_SELF).ru_stime
        resource.setrlimit(resource.RLIMIT_CPU, (min(hard, int(used + row["cpu_s"]) + 1), hard))
        try:
            reward = grade(row["sample"], row["item"])
            problem = reward_error(reward)
            answer = {"error": problem} if problem else {"reward": float(reward)}
        except BaseException as exc:  # noqa: BLE001 - any failure is this row's error, reported to the relay
            answer = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        out.write(json.dumps(answer) + "\n")
        out.flush()


NOT_AN_ANSWER = {"error": "ValueError: the grader process wrote a line that is not an answer", "restart": True}


def checked_answer(line: bytes) -> dict:
    """A grader's answer line as data: {"reward": r} with r a finite number in [0, 1], or {"error": text}
    ("restart" kept when the grader is ending). Any other line, a forged one in the server's format included,
    is this row's error and ends the grader process."""
    try:
        answer = json.loads(line)
    except (ValueError, RecursionError):
        return NOT_AN_ANSWER
    if not isinstance(answer, dict):
        return NOT_AN_ANSWER
    restart = {"restart": True} if answer.pop("restart", None) is True else {}
    if set(answer) == {"error"} and isinstance(answer["error"], str):
        return {"error": answer["error"][:2000], **restart}
    if set(answer) != {"reward"}:
        return NOT_AN_ANSWER
    problem = reward_error(answer["reward"])
    return {"error": problem, "restart": True} if problem else {"reward": float(answer["reward"]), **restart}


def reward_error(reward) -> str | None:
    """Why ``reward`` is not a python grader's reward (a finite number in [0, 1]), or None; the grader
    process, the relay and the server all ask this one question."""
    if isinstance(reward, bool) or not isinstance(reward, int | float) or not math.isfinite(reward):
        return f"TypeError: grade() must return a finite number, not {str(reward)[:100]}"
    if not 0.0 <= reward <= 1.0:
        return f"ValueError: grade() must return a number in [0, 1], not {reward:g}"
    return None


class GraderPipe:
    """The relay's end of the grader process: rows out, answer lines in, each bounded."""

    def __init__(self, pid: int, rows_fd: int, answers_fd: int):
        self.pid, self.rows, self.answers, self.buffer = pid, rows_fd, answers_fd, b""
        os.set_blocking(rows_fd, False)  # a grader that stops reading cannot hold the relay past the deadline

    def send(self, row: dict, deadline: float) -> bool:
        """The row written whole; False when the grader process ended; TimeoutError at ``deadline``."""
        data = (json.dumps(row) + "\n").encode()
        while data:
            wait_for(self.rows, deadline, select.POLLOUT)
            try:
                data = data[os.write(self.rows, data):]
            except BlockingIOError:
                continue
            except OSError:
                return False
        return True

    def line(self, deadline: float) -> bytes | dict | None:
        """The next line the grader process wrote; an error dict when it wrote too much without a line end;
        None when it ended. TimeoutError at ``deadline``, ServerGone when the server ends first."""
        while b"\n" not in self.buffer:
            if len(self.buffer) > ANSWER_BYTES:
                return {"error": f"ValueError: the grader process wrote more than {ANSWER_BYTES} bytes "
                                 "without a line end", "restart": True}
            wait_for(self.answers, deadline)
            chunk = os.read(self.answers, ANSWER_BYTES + 1)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        if len(line) > ANSWER_BYTES:
            return {"error": f"ValueError: the grader process wrote a line of more than {ANSWER_BYTES} bytes",
                    "restart": True}
        return line

    def answer(self, deadline: float) -> dict | None:
        """The next checked answer (see :func:`checked_answer`), or None when the grader process ended."""
        line = self.line(deadline)
        if not isinstance(line, bytes):
            return line
        answer = checked_answer(line)
        if self.buffer and "restart" not in answer:  # more than one line for one row: the grader is ended
            answer = {"error": "ValueError: the grader process wrote more than one answer for a row", "restart": True}
        return answer

    def loaded(self, startup_s: float) -> str | None:
        """None once the grader process says it loaded the source, else why it did not (ServerGone when the
        server ends first)."""
        try:
            line = self.line(time.monotonic() + startup_s)
        except TimeoutError:
            return f"TimeoutError: the grader took longer than {startup_s:g} s to load its source"
        try:
            first = json.loads(line) if isinstance(line, bytes) else {}
        except (ValueError, RecursionError):
            first = {}
        if isinstance(first, dict) and first.get("ready") is True:
            return None
        if isinstance(first, dict) and isinstance(first.get("fatal"), str):
            return first["fatal"][:2000]
        return "RuntimeError: the grader process ended or wrote something else while loading its source"

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


class ServerRows:
    """The server's rows on :data:`SERVER`, a line at a time, each waited for at most the wall clock."""

    def __init__(self):
        self.buffer = b""

    def next(self, deadline: float) -> dict | None:
        """The next row; None at the end of the server's input (it closed the pipe: it ended, or has no more
        rows); TimeoutError at ``deadline``."""
        while b"\n" not in self.buffer:
            wait_for(SERVER, deadline)  # readable at the server's end too: what it wrote, then the end
            chunk = os.read(SERVER, 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)  # the server's own line: trusted


def relay(pipe: GraderPipe, server_out, wall_s: float) -> None:
    """Pass each row of the server's to the grader process and its checked answer back with the row's token;
    end (the caller then kills the grader) when the grader process ends or breaks the protocol, a row runs past
    ``wall_s``, the server sends no row for ``wall_s``, or the server ends."""
    rows = ServerRows()
    while True:
        try:
            row = rows.next(time.monotonic() + wall_s)
        except TimeoutError:  # the server is stopped or stalled: the grader may not wait with it
            server_out.write(json.dumps({"ended": f"RuntimeError: the sandbox waited more than {wall_s:g} s for "
                                                  "the server's next row and ended the grader"}) + "\n")
            server_out.flush()
            return
        if row is None:
            return
        start, deadline = time.perf_counter(), time.monotonic() + wall_s
        try:
            answer = pipe.answer(deadline) if pipe.send({k: row[k] for k in ("sample", "item", "cpu_s")},
                                                        deadline) else None
        except TimeoutError:
            pipe.kill()
            answer = {"error": f"TimeoutError: the grader ran past its wall-clock limit of {wall_s:g} s",
                      "restart": True}
        if answer is None:
            return  # the server names the reason (a limit, a crash) from the process's end and its stderr
        answer.update(token=row["token"], seconds=time.perf_counter() - start)
        server_out.write(json.dumps(answer) + "\n")
        server_out.flush()
        if answer.get("restart"):
            return


def run_grader(folder, read_roots, seccomp, rows_fd: int, answers_fd: int) -> None:
    """In the forked grader process: lock in further, load the caller's source and grade rows; never returns."""
    out = os.fdopen(answers_fd, "w")
    try:
        landlock(read_roots, [folder], ["/dev/null", "/dev/urandom"])  # a nested layer: the relay is outside it
        seccomp.install()  # no sockets, no new tasks, from here on
        audit_hook(folder, read_roots)
        namespace = {"__name__": "grader"}
        with open(os.path.join(folder, "grader.py"), encoding="utf-8") as f:
            source = f.read()
        exec(compile(source, "grader.py", "exec"), namespace)  # noqa: S102 - the caller's grader, sandboxed above
        if not callable(namespace.get("grade")):
            raise TypeError("the source defines no grade(sample, item) function")
    except BaseException as exc:  # noqa: BLE001 - reported to the relay as every row's error
        out.write(json.dumps({"fatal": f"{type(exc).__name__}: {exc}"[:2000]}) + "\n")
        out.flush()
        os._exit(0)
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    try:
        grade_rows(namespace["grade"], os.fdopen(rows_fd, "r"), out)
    finally:
        os._exit(0)


def start_grader(folder, read_roots, seccomp, keep_out: list[int]) -> GraderPipe:
    """Fork the grader process with a pipe each way; it keeps none of ``keep_out`` (the server's channel) and
    installs ``seccomp``'s filter (:mod:`tunesmith.graders.seccomp`, loaded here by the relay)."""
    rows_r, rows_w = os.pipe()
    answers_r, answers_w = os.pipe()
    relay_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        die_with_parent(relay_pid)
        for fd in (*keep_out, rows_w, answers_r):
            os.close(fd)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        run_grader(folder, read_roots, seccomp, rows_r, answers_w)
    os.close(rows_r)
    os.close(answers_w)
    return GraderPipe(pid, rows_w, answers_r)


def _flag(name: str, default: float) -> float:
    return float(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


def main() -> None:
    folder = os.getcwd()
    if "--probe" in sys.argv:  # the host check: can this sandbox be built here?
        isolate_filesystem(folder, 1)
        print("isolated")
        return
    server_out_fd = os.dup(1)
    server_out = os.fdopen(server_out_fd, "w")
    os.dup2(2, 1)  # prints go to stderr, never into the answers
    read_roots = sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                         sys.base_exec_prefix)} | {"/usr/lib", "/lib", "/lib64"})
    seccomp = sibling("seccomp")  # read before Landlock: this file's folder may lie outside read_roots
    if "--folder-mb" in sys.argv:
        try:
            isolate_filesystem(folder, int(sys.argv[sys.argv.index("--folder-mb") + 1]))
        except OSError as exc:
            server_out.write(json.dumps({"fatal": f"RuntimeError: the sandbox could not be built: {exc}"}) + "\n")
            server_out.flush()
            return
    abi = landlock(read_roots, [folder], ["/dev/null", "/dev/urandom"])
    ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, _long(0), _long(0), _long(0), _long(0))
    wall_s, startup_s = _flag("--wall-s", 30.0), _flag("--startup-s", 20.0)
    pipe = start_grader(folder, read_roots, seccomp, keep_out=[SERVER, server_out_fd])
    try:
        fatal = pipe.loaded(startup_s)
        server_out.write(json.dumps({"fatal": fatal} if fatal else {"ready": True, "landlock": abi}) + "\n")
        server_out.flush()
        if fatal is None:
            relay(pipe, server_out, wall_s)
    except (ServerGone, BrokenPipeError):
        pass  # the server is gone: nobody to answer
    finally:
        pipe.kill()


if __name__ == "__main__":
    main()
