"""The process a python grader runs in (started by :mod:`tunesmith.graders.sandbox` as ``python -I <this file>``
inside its own folder; it imports nothing from tunesmith).

Before the grader's source is even compiled it (1) restricts itself with Landlock, the kernel's unprivileged
sandbox: files may be read only under Python's own installation, written only in the grader's folder, and no
TCP connection or bind is allowed; (2) installs an audit hook refusing sockets, new processes and opening
files outside those folders with a readable error. Then it grades one JSON line from stdin at a time and
answers each with one JSON line on the original stdout (what the grader prints goes to stderr).
"""

import ctypes
import json
import math
import os
import resource
import signal
import sys
import time

READ = 1 | 4 | 8  # Landlock: execute, read file, read directory
FILE_RW = 2 | 4  # write file, read file (rules on single files such as /dev/null)
BLOCKED_EVENTS = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                  "os.kill", "os.killpg", "pty.spawn", "os.chroot", "sys.remote_exec")


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


def grade_rows(grade, out) -> None:
    """One JSON line in, one out: {"reward": x} or {"error": "Type: message"}; stops at the end of stdin."""
    for line in sys.stdin:
        row = json.loads(line)
        signal.signal(signal.SIGXCPU, on_cpu_limit(out, row["cpu_s"]))
        soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
        used = resource.getrusage(resource.RUSAGE_SELF).ru_utime + resource.getrusage(resource.RUSAGE_SELF).ru_stime
        resource.setrlimit(resource.RLIMIT_CPU, (min(hard, int(used + row["cpu_s"]) + 1), hard))
        start = time.perf_counter()
        try:
            reward = grade(row["sample"], row["item"])
            if isinstance(reward, bool) or not isinstance(reward, int | float) or not math.isfinite(reward):
                raise TypeError(f"grade() must return a finite number, not {reward!r}")
            answer = {"reward": float(reward)}
        except BaseException as exc:  # noqa: BLE001 - any failure is this row's error, reported to the parent
            answer = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        answer["seconds"] = time.perf_counter() - start
        out.write(json.dumps(answer) + "\n")
        out.flush()


def main() -> None:
    folder = os.getcwd()
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the grader's prints go to stderr, never into the answers
    read_roots = sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                         sys.base_exec_prefix)} | {"/usr/lib", "/lib", "/lib64"})
    abi = landlock(read_roots, [folder], ["/dev/null", "/dev/urandom"])
    audit_hook(folder, read_roots)
    namespace = {"__name__": "grader"}
    try:
        with open(os.path.join(folder, "grader.py"), encoding="utf-8") as f:
            source = f.read()
        exec(compile(source, "grader.py", "exec"), namespace)  # noqa: S102 - the caller's grader, sandboxed above
        if not callable(namespace.get("grade")):
            raise TypeError("the source defines no grade(sample, item) function")
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as every row's error
        out.write(json.dumps({"fatal": f"{type(exc).__name__}: {exc}"[:2000]}) + "\n")
        out.flush()
        return
    out.write(json.dumps({"ready": True, "landlock": abi}) + "\n")
    out.flush()
    grade_rows(namespace["grade"], out)


if __name__ == "__main__":
    main()
