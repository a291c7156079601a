"""The seccomp filter of the python grader process: an allow list. The system calls a Python grader needs to
compute a reward run; every other call fails.

The grader process (:mod:`tunesmith.graders.sandbox_child`) installs it on itself before the caller's source
is compiled; it is kept across ``execve`` and can never be removed. What is allowed (:data:`ALLOWED`):

- reading and writing its own descriptors (files it opened, its pipes), seeking, ``fstat``, ``ftruncate`` of
  an open file, ``poll``/``select``/``epoll``, pipes and eventfds;
- paths: ``open``/``openat``, ``stat``, listing, making and removing directories and files, renaming, reading
  links, ``access`` (what a path may be is Landlock's and the read-only mount's rule, not this filter's);
- memory (``mmap``, ``brk``, NUMA policy for numpy), its own signal handlers, masks, timers and alarms;
- clocks, sleeping, its own ids, limits and usage, ``uname``, CPU affinity, ``getrandom``, ``prctl``;
- ``futex`` and the thread-area calls the C library makes for its one thread; ``exit``.

Everything else fails with ``EPERM``, so a grader gets a plain ``PermissionError: [Errno 1] Operation not
permitted`` it can report, and a test can tell the filter's refusal from any other failure: sockets of every
family, new processes and threads (``clone``, ``fork``, ``execve``), signals to any process (``kill``,
``tgkill``, ``pidfd_send_signal``), ``ptrace`` and ``process_vm_*``, changing a file's mode, owner, extended
attributes or times (``chmod``, ``chown``, ``setxattr``, ``utimensat``: no Landlock ABI governs them), truncating
by path (``truncate``; before Linux 6.2 Landlock does not govern it), hard and symbolic links, ``mknod``,
``ioctl``, ``io_uring``, ``bpf``, ``mount``, ``unshare``, ``setns``, ``keyctl``, ``open_by_handle_at``, the
set-id calls. A deny list leaks whatever its author did not think of; an allow list leaks only what it names.
Any system call made through another ABI than the interpreter's own (``int 0x80``'s i386 table on x86_64,
AArch32 on aarch64) and any number with x86_64's x32 bit (``0x40000000``) is refused too: those tables number
the calls differently.

Why a hand-written BPF program installed through ``prctl`` with ctypes, not a binding: the whole filter is the
numbers below in one program of straight comparisons, read in one screen; it needs neither the system's
libseccomp nor a package. x86_64 and aarch64 only: elsewhere :func:`install` raises and python graders are
refused. The numbers are the kernel's ``asm/unistd_64.h`` (x86_64) and ``asm-generic/unistd.h`` (aarch64, which
has no ``open``, ``stat``, ``pipe``…: its C library uses the ``*at`` forms); tests/test_graders_seccomp.py
compares them again where the headers are installed.

This file imports nothing from tunesmith: the sandbox's relay loads it by path. ``python -I seccomp.py``
installs the filter in a throwaway process and prints ``refused`` when a socket, a fork, a ``chmod`` and a
``kill`` are then refused (the probe behind :func:`tunesmith.graders.sandbox.refusal`).
"""

import ctypes
import errno
import os
import struct

ALLOWED = {  # group -> the calls a Python grader makes (a name missing from an architecture's table is skipped)
    "descriptors": "read write readv writev pread64 pwrite64 preadv pwritev preadv2 pwritev2 lseek close close_range "
                   "dup dup2 dup3 fcntl fstat newfstatat fstatat statx fstatfs statfs flock fsync fdatasync ftruncate "
                   "fallocate pipe pipe2 poll ppoll select pselect6 epoll_create epoll_create1 epoll_ctl epoll_wait "
                   "epoll_pwait epoll_pwait2 eventfd eventfd2",
    "paths": "stat lstat open openat openat2 getdents getdents64 getcwd chdir fchdir mkdir mkdirat rmdir unlink unlinkat "
             "rename renameat renameat2 readlink readlinkat access faccessat faccessat2 umask",
    "memory": "brk mmap munmap mprotect mremap madvise mbind get_mempolicy set_mempolicy membarrier mincore",
    "own signals": "rt_sigaction rt_sigprocmask rt_sigreturn sigaltstack rt_sigpending rt_sigsuspend rt_sigtimedwait "
                   "alarm setitimer getitimer pause",
    "time": "clock_gettime clock_getres gettimeofday time nanosleep clock_nanosleep times",
    "itself": "getpid gettid getppid getuid geteuid getgid getegid getgroups getresuid getresgid getpgrp getpgid getsid "
              "getrusage getrlimit setrlimit prlimit64 uname sysinfo sched_getaffinity sched_yield getcpu getrandom prctl",
    "its one thread": "futex futex_waitv set_robust_list get_robust_list rseq set_tid_address arch_prctl exit "
                      "exit_group restart_syscall",
}
NUMBERS = {  # the native ABI's numbers of the allowed calls (kernel headers: see the module's docstring)
    "x86_64": {
        "read": 0, "write": 1, "readv": 19, "writev": 20, "pread64": 17, "pwrite64": 18, "preadv": 295, "pwritev": 296,
        "preadv2": 327, "pwritev2": 328, "lseek": 8, "close": 3, "close_range": 436, "dup": 32, "dup2": 33, "dup3": 292,
        "fcntl": 72, "fstat": 5, "newfstatat": 262, "statx": 332, "fstatfs": 138, "statfs": 137, "flock": 73,
        "fsync": 74, "fdatasync": 75, "ftruncate": 77, "fallocate": 285, "pipe": 22, "pipe2": 293, "poll": 7,
        "ppoll": 271, "select": 23, "pselect6": 270, "epoll_create": 213, "epoll_create1": 291, "epoll_ctl": 233,
        "epoll_wait": 232, "epoll_pwait": 281, "epoll_pwait2": 441, "eventfd": 284, "eventfd2": 290, "stat": 4,
        "lstat": 6, "open": 2, "openat": 257, "openat2": 437, "getdents": 78, "getdents64": 217, "getcwd": 79,
        "chdir": 80, "fchdir": 81, "mkdir": 83, "mkdirat": 258, "rmdir": 84, "unlink": 87, "unlinkat": 263,
        "rename": 82, "renameat": 264, "renameat2": 316, "readlink": 89, "readlinkat": 267, "access": 21,
        "faccessat": 269, "faccessat2": 439, "umask": 95, "brk": 12, "mmap": 9, "munmap": 11, "mprotect": 10,
        "mremap": 25, "madvise": 28, "mbind": 237, "get_mempolicy": 239, "set_mempolicy": 238, "membarrier": 324,
        "mincore": 27, "rt_sigaction": 13, "rt_sigprocmask": 14, "rt_sigreturn": 15, "sigaltstack": 131,
        "rt_sigpending": 127, "rt_sigsuspend": 130, "rt_sigtimedwait": 128, "alarm": 37, "setitimer": 38,
        "getitimer": 36, "pause": 34, "clock_gettime": 228, "clock_getres": 229, "gettimeofday": 96, "time": 201,
        "nanosleep": 35, "clock_nanosleep": 230, "times": 100, "getpid": 39, "gettid": 186, "getppid": 110,
        "getuid": 102, "geteuid": 107, "getgid": 104, "getegid": 108, "getgroups": 115, "getresuid": 118,
        "getresgid": 120, "getpgrp": 111, "getpgid": 121, "getsid": 124, "getrusage": 98, "getrlimit": 97,
        "setrlimit": 160, "prlimit64": 302, "uname": 63, "sysinfo": 99, "sched_getaffinity": 204, "sched_yield": 24,
        "getcpu": 309, "getrandom": 318, "prctl": 157, "futex": 202, "futex_waitv": 449, "set_robust_list": 273,
        "get_robust_list": 274, "rseq": 334, "set_tid_address": 218, "arch_prctl": 158, "exit": 60, "exit_group": 231,
        "restart_syscall": 219},
    "aarch64": {
        "read": 63, "write": 64, "readv": 65, "writev": 66, "pread64": 67, "pwrite64": 68, "preadv": 69, "pwritev": 70,
        "preadv2": 286, "pwritev2": 287, "lseek": 62, "close": 57, "close_range": 436, "dup": 23, "dup3": 24,
        "fcntl": 25, "fstat": 80, "fstatat": 79, "statx": 291, "fstatfs": 44, "statfs": 43, "flock": 32, "fsync": 82,
        "fdatasync": 83, "ftruncate": 46, "fallocate": 47, "pipe2": 59, "ppoll": 73, "pselect6": 72,
        "epoll_create1": 20, "epoll_ctl": 21, "epoll_pwait": 22, "epoll_pwait2": 441, "eventfd2": 19, "openat": 56,
        "openat2": 437, "getdents64": 61, "getcwd": 17, "chdir": 49, "fchdir": 50, "mkdirat": 34, "unlinkat": 35,
        "renameat": 38, "renameat2": 276, "readlinkat": 78, "faccessat": 48, "faccessat2": 439, "umask": 166,
        "brk": 214, "mmap": 222, "munmap": 215, "mprotect": 226, "mremap": 216, "madvise": 233, "mbind": 235,
        "get_mempolicy": 236, "set_mempolicy": 237, "membarrier": 283, "mincore": 232, "rt_sigaction": 134,
        "rt_sigprocmask": 135, "rt_sigreturn": 139, "sigaltstack": 132, "rt_sigpending": 136, "rt_sigsuspend": 133,
        "rt_sigtimedwait": 137, "setitimer": 103, "getitimer": 102, "clock_gettime": 113, "clock_getres": 114,
        "gettimeofday": 169, "nanosleep": 101, "clock_nanosleep": 115, "times": 153, "getpid": 172, "gettid": 178,
        "getppid": 173, "getuid": 174, "geteuid": 175, "getgid": 176, "getegid": 177, "getgroups": 158,
        "getresuid": 148, "getresgid": 150, "getpgid": 155, "getsid": 156, "getrusage": 165, "getrlimit": 163,
        "setrlimit": 164, "prlimit64": 261, "uname": 160, "sysinfo": 179, "sched_getaffinity": 123,
        "sched_yield": 124, "getcpu": 168, "getrandom": 278, "prctl": 167, "futex": 98, "futex_waitv": 449,
        "set_robust_list": 99, "get_robust_list": 100, "rseq": 293, "set_tid_address": 96, "exit": 93,
        "exit_group": 94, "restart_syscall": 128},
}
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}  # EM_* | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE
X32_BIT = 0x40000000

LD_W_ABS, JEQ, JGE, RET = 0x20, 0x15, 0x35, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, …JGE…, BPF_RET|BPF_K
NR, ARCH = 0, 4  # offsets in struct seccomp_data
ALLOW, REFUSE = 0x7FFF0000, 0x00050000 | errno.EPERM  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
PR_SET_NO_NEW_PRIVS, PR_GET_SECCOMP, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 21, 22, 2


def machine() -> str:
    """The interpreter's ABI as the table's key ('' for one it does not cover, a 32-bit build included)."""
    name = os.uname().machine
    return name if name in NUMBERS and ctypes.sizeof(ctypes.c_void_p) == 8 else ""


def program(arch: str) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions: the native architecture or refuse; an x32 number or
    refuse; an allowed number or refuse. Jumps count the instructions skipped."""
    numbers = sorted(set(NUMBERS[arch].values()))
    n = len(numbers)  # instructions: 4 of head, n checks, then refuse (index 4 + n) and allow (5 + n)
    head = [(LD_W_ABS, 0, 0, ARCH), (JEQ, 0, n + 2, AUDIT_ARCH[arch]), (LD_W_ABS, 0, 0, NR), (JGE, n, 0, X32_BIT)]
    checks = [(JEQ, n - i, 0, nr) for i, nr in enumerate(numbers)]
    return [*head, *checks, (RET, 0, 0, REFUSE), (RET, 0, 0, ALLOW)]


def install() -> None:
    """Install the filter on this process, for good (it is kept across ``execve``); OSError saying why not."""
    arch = machine()
    if not arch:
        raise OSError(errno.ENOSYS, f"no seccomp filter for this interpreter's ABI ({os.uname().machine}, "
                                    f"{8 * ctypes.sizeof(ctypes.c_void_p)}-bit): python graders need x86_64 or aarch64")
    code = b"".join(struct.pack("=HBBI", *ins) for ins in program(arch))

    class Program(ctypes.Structure):  # struct sock_fprog
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)):
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    fprog = Program(len(code) // 8, code)
    if libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog), ctypes.c_ulong(0),
                  ctypes.c_ulong(0)):
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed: the kernel refused the seccomp filter")
    if libc.prctl(PR_GET_SECCOMP, ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 2:
        raise OSError(errno.EPERM, "the seccomp filter is not in force after installing it")


def probe() -> str:
    """'refused' when, with the filter installed here, a socket, a fork, a chmod and a kill are refused with EPERM
    (and this process still runs Python); else why not."""
    try:
        install()
    except OSError as exc:
        return f"the seccomp filter cannot be installed: {exc}"
    libc = ctypes.CDLL(None, use_errno=True)
    attempts = (("socket()", lambda: libc.socket(1, 1, 0)), ("fork()", libc.fork),
                ("chmod()", lambda: libc.chmod(b"/", 0o755)), ("kill()", lambda: libc.kill(os.getpid(), 0)))
    for name, attempt in attempts:
        result = attempt()
        if result == 0 and name == "fork()":
            os._exit(0)  # a child the filter let through
        if result >= 0 or ctypes.get_errno() != errno.EPERM:
            return f"the seccomp filter is installed but {name} gave {result} (errno {ctypes.get_errno()})"
    return "refused"


if __name__ == "__main__":
    print(probe())
