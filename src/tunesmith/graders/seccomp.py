"""The seccomp filter of the python grader process: no socket system call succeeds, for any address family,
and no new process or thread starts.

The grader process (:mod:`tunesmith.graders.sandbox_child`) installs it on itself before the caller's source
is compiled; it is kept across ``execve`` and can never be removed. Every call below fails with ``EPERM``,
so a grader gets a plain ``PermissionError: [Errno 1] Operation not permitted`` it can report, and a test
can tell the filter's refusal from any other failure (killing the process would be as safe, but the row
would only say that the process ended):

- ``socket``, ``socketpair``: no new socket (there is none to inherit: the grader's descriptors are pipes
  and files), hence nothing to ``connect``, ``bind``, ``listen``, ``accept``/``accept4``, send or receive on.
  Those are refused too (``sendto``, ``sendmsg``, ``sendmmsg``, ``recvfrom``, ``recvmsg``, ``recvmmsg``,
  ``shutdown``, ``get/setsockopt``, ``getsockname``, ``getpeername``): the rule to audit is "the socket
  system calls, all of them", and none has a use on a pipe.
- ``io_uring_setup``/``_enter``/``_register``: an io_uring ring creates and connects sockets itself
  (``IORING_OP_SOCKET``, ``IORING_OP_CONNECT``) without any of the calls above.
- ``pidfd_getfd``: copies a descriptor (a socket) out of another process.
- ``clone``, ``clone3``, ``fork``, ``vfork``: the grader process stays one task. ``RLIMIT_NPROC`` cannot
  promise that: the kernel does not apply it to root, and measured as root (a server in a container) a
  fork loop under ``RLIMIT_NPROC`` 32 started 200 processes. The audit hook already refused Python's own
  ways to start processes; this makes it the kernel's rule, threads included (a grader that starts a
  thread gets ``RuntimeError: can't start new thread``).
- Any system call made through another ABI than the interpreter's own (``int 0x80``'s i386 table on x86_64,
  AArch32 on aarch64) and any number with x86_64's x32 bit (``0x40000000``): those tables number the
  calls differently (i386 has ``socketcall``), so the program checks the architecture first and refuses
  every such call.

Why a hand-written BPF program installed through ``prctl`` with ctypes, not a binding: the whole filter is the
numbers below in a program of 32 instructions (30 on aarch64), read in one screen; it needs neither the system's libseccomp
nor a package (pyseccomp, the ctypes binding on PyPI, was last released in 2021; libseccomp's own binding
builds with Cython against its headers). x86_64 and aarch64 only: elsewhere :func:`install` raises and
python graders are refused. The numbers are the kernel's ``asm/unistd_64.h`` (x86_64) and
``asm-generic/unistd.h`` (aarch64, which has no ``fork``/``vfork``); tests/test_graders_seccomp.py compares
them again where the headers are installed.

This file imports nothing from tunesmith: the sandbox's relay loads it by path. ``python -I seccomp.py``
installs the filter in a throwaway process and prints ``refused`` when a socket and a fork are then refused
(the probe behind :func:`tunesmith.graders.sandbox.refusal`).
"""

import ctypes
import errno
import os
import struct

SOCKETS = ("socket", "socketpair", "connect", "bind", "listen", "accept", "accept4", "sendto", "sendmsg", "sendmmsg",
           "recvfrom", "recvmsg", "recvmmsg", "shutdown", "getsockname", "getpeername", "setsockopt", "getsockopt",
           "io_uring_setup", "io_uring_enter", "io_uring_register", "pidfd_getfd")
TASKS = ("clone", "clone3", "fork", "vfork")
NUMBERS = {  # the native ABI's numbers of the refused calls
    "x86_64": dict(zip(SOCKETS + TASKS, (41, 53, 42, 49, 50, 43, 288, 44, 46, 307, 45, 47, 299, 48, 51, 52, 54, 55,
                                         425, 426, 427, 438, 56, 435, 57, 58), strict=True)),
    "aarch64": dict(zip(SOCKETS + TASKS[:2], (198, 199, 203, 200, 201, 202, 242, 206, 211, 269, 207, 212, 243, 210,
                                              204, 205, 208, 209, 425, 426, 427, 438, 220, 435), strict=True)),
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
    refuse; a denied number or refuse; else allow. Jumps count the instructions skipped."""
    numbers = sorted(NUMBERS[arch].values())
    refuse_at = 4 + len(numbers) + 1  # the index of the last instruction
    head = [(LD_W_ABS, 0, 0, ARCH), (JEQ, 0, refuse_at - 2, AUDIT_ARCH[arch]),
            (LD_W_ABS, 0, 0, NR), (JGE, refuse_at - 4, 0, X32_BIT)]
    checks = [(JEQ, refuse_at - (4 + i + 1), 0, nr) for i, nr in enumerate(numbers)]
    return [*head, *checks, (RET, 0, 0, ALLOW), (RET, 0, 0, REFUSE)]


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
    """'refused' when, with the filter installed here, a socket and a fork are refused with EPERM; else why not."""
    try:
        install()
    except OSError as exc:
        return f"the seccomp filter cannot be installed: {exc}"
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.socket(1, 1, 0)  # AF_UNIX, SOCK_STREAM
    if fd >= 0 or ctypes.get_errno() != errno.EPERM:
        return f"the seccomp filter is installed but socket() gave {fd} (errno {ctypes.get_errno()})"
    pid = libc.fork()
    if pid == 0:
        os._exit(0)  # a child the filter let through
    if pid >= 0 or ctypes.get_errno() != errno.EPERM:
        return f"the seccomp filter is installed but fork() gave {pid} (errno {ctypes.get_errno()})"
    return "refused"


if __name__ == "__main__":
    print(probe())
