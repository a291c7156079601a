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
PR_SET_DUMPABLE = 4


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

    def send(self, row: dict) -> bool:
        try:
            os.write(self.rows, (json.dumps(row) + "\n").encode())
            return True
        except OSError:
            return False

    def line(self) -> bytes | dict | None:
        """The next line the grader process wrote; an error dict when it wrote too much without a line end;
        None when it ended."""
        while b"\n" not in self.buffer:
            if len(self.buffer) > ANSWER_BYTES:
                return {"error": f"ValueError: the grader process wrote more than {ANSWER_BYTES} bytes "
                                 "without a line end", "restart": True}
            select.select([self.answers], [], [])
            chunk = os.read(self.answers, ANSWER_BYTES + 1)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        if len(line) > ANSWER_BYTES:
            return {"error": f"ValueError: the grader process wrote a line of more than {ANSWER_BYTES} bytes",
                    "restart": True}
        return line

    def answer(self) -> dict | None:
        """The next checked answer (see :func:`checked_answer`), or None when the grader process ended."""
        line = self.line()
        if not isinstance(line, bytes):
            return line
        answer = checked_answer(line)
        if self.buffer and "restart" not in answer:  # more than one line for one row: the grader is ended
            answer = {"error": "ValueError: the grader process wrote more than one answer for a row", "restart": True}
        return answer

    def loaded(self) -> str | None:
        """None once the grader process says it loaded the source, else why it did not."""
        line = self.line()
        try:
            first = json.loads(line) if isinstance(line, bytes) else {}
        except (ValueError, RecursionError):
            first = {}
        if isinstance(first, dict) and first.get("ready") is True:
            return None
        if isinstance(first, dict) and isinstance(first.get("fatal"), str):
            return first["fatal"][:2000]
        return "RuntimeError: the grader process ended or wrote something else while loading its source"


def relay(pipe: GraderPipe, server_in, server_out) -> None:
    """Pass each row of the server's to the grader process and its checked answer back with the row's token;
    end (ending the grader) when the grader process ends or breaks the protocol."""
    for line in server_in:
        row = json.loads(line)  # the server's own line: trusted
        start = time.perf_counter()
        answer = pipe.answer() if pipe.send({k: row[k] for k in ("sample", "item", "cpu_s")}) else None
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
    pid = os.fork()
    if pid == 0:
        for fd in (*keep_out, rows_w, answers_r):
            os.close(fd)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        run_grader(folder, read_roots, seccomp, rows_r, answers_w)
    os.close(rows_r)
    os.close(answers_w)
    return GraderPipe(pid, rows_w, answers_r)


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
    pipe = start_grader(folder, read_roots, seccomp, keep_out=[0, server_out_fd])
    fatal = pipe.loaded()
    server_out.write(json.dumps({"fatal": fatal} if fatal else {"ready": True, "landlock": abi}) + "\n")
    server_out.flush()
    if fatal is None:
        relay(pipe, sys.stdin, server_out)
    os.kill(pipe.pid, signal.SIGKILL)

if __name__ == "__main__":
    main()
