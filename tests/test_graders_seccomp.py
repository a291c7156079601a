"""The python grader process has no sockets and starts no process: each attack below is grader code as an attacker writes it,
straight through libc with ctypes (no audit hook sees that), against a listener this test process holds on
the host. Each runs with the sandbox as it is here (namespaces, Landlock, seccomp) and again without the
namespaces (a host where unprivileged user namespaces are off: Landlock and seccomp only), where UDP and
Unix sockets would otherwise reach the host. Also: the filter program itself for both architectures, its
numbers against the kernel's headers, and the refusal of hosts that cannot sandbox."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import socket
from pathlib import Path

import pytest

from tunesmith.errors import ConfigError
from tunesmith.graders import sandbox, seccomp
from tunesmith.graders.sandbox import landlock_abi, namespaces, run_python

ATTACKS = r'''
import ctypes, mmap, os, socket, struct

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def check(result, call):
    if result < 0:
        number = ctypes.get_errno()
        raise OSError(number, f"{call}: {os.strerror(number)}")
    return result

def unix_address(name):  # struct sockaddr_un, as long as the name (a leading NUL: an abstract name)
    return struct.pack("H", socket.AF_UNIX) + name

def inet_address(port):
    return struct.pack("<HH4s8x", socket.AF_INET, socket.htons(port), bytes([127, 0, 0, 1]))

def connect_and_send(family, kind, address):
    fd = check(libc.socket(family, kind, 0), "socket")
    check(libc.connect(fd, address, len(address)), "connect")
    check(libc.send(fd, b"leak", 4, 0), "send")
    return 1.0

def int80_socket():  # socket(AF_UNIX, SOCK_STREAM, 0) through the i386 table (number 359) from 64-bit code
    code = bytes.fromhex("53b867010000bb01000000b90100000031d2cd805bc3")  # push rbx … int 0x80; pop rbx; ret
    page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    fd = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))()
    if fd < 0:  # the kernel's answer itself: minus the error number
        raise OSError(-fd, f"int 0x80 socket: {os.strerror(-fd)}")
    return fd

def grade(sample, item):
    attack = item["attack"]
    if attack == "benign":
        return 1.0 if sample["output_text"].strip() == item["answer"] else 0.0
    if attack == "unix_path":
        return connect_and_send(socket.AF_UNIX, socket.SOCK_STREAM, unix_address(item["path"].encode() + b"\0"))
    if attack == "unix_abstract":
        return connect_and_send(socket.AF_UNIX, socket.SOCK_STREAM, unix_address(b"\0" + item["name"].encode()))
    if attack == "udp_sendto":
        fd = check(libc.socket(socket.AF_INET, socket.SOCK_DGRAM, 0), "socket")
        address = inet_address(item["port"])
        check(libc.sendto(fd, b"leak", 4, 0, address, len(address)), "sendto")
        return 1.0
    if attack == "raw":
        check(libc.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP), "socket")
        return 1.0
    if attack == "socketpair":
        pair = (ctypes.c_int * 2)()
        check(libc.socketpair(socket.AF_UNIX, socket.SOCK_STREAM, 0, pair), "socketpair")
        return 1.0
    if attack == "socket_module":
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(item["path"])
            s.sendall(b"leak")
        return 1.0
    if attack == "io_uring":  # a ring would create and connect sockets without the socket calls
        check(libc.syscall(ctypes.c_long(425), ctypes.c_long(4), ctypes.create_string_buffer(120)), "io_uring_setup")
        return 1.0
    if attack == "x32":
        check(libc.syscall(ctypes.c_long(0x40000000 | 41), 1, 1, 0), "x32 socket")
        return 1.0
    if attack == "int80":
        int80_socket()
        return 1.0
    if attack == "filter_in_force":  # prctl(PR_GET_SECCOMP): 2 is a filter
        return 1.0 if libc.prctl(21, 0, 0, 0, 0) == 2 else 0.0
    if attack == "fork_bomb":
        born = 0
        while born < 200:
            pid = libc.fork()
            if pid == 0:
                libc.pause()
                libc._exit(0)
            check(pid, f"fork after {born} processes")
            born += 1
        return 1.0
    if attack == "threads":
        import threading
        threading.Thread(target=lambda: None).start()
        return 1.0
'''

X86_64 = os.uname().machine == "x86_64"
MODES = [pytest.param(True, id="namespaces", marks=pytest.mark.skipif(namespaces() is not None, reason=(
    f"the grader's namespaces cannot be built here: {namespaces()}"))),
         pytest.param(False, id="inner-layers", marks=pytest.mark.skipif(landlock_abi() < 1, reason=(
             "no Landlock here: python graders are refused (tested below)")))]


@pytest.fixture(name="namespaces", params=MODES)
def with_namespaces(request, monkeypatch):
    """The sandbox as on this host, or its inner layers alone (Landlock, seccomp, the audit hook): each layer
    must hold by itself."""
    if not request.param:
        monkeypatch.setattr(sandbox, "NAMESPACED", False)
    return request.param


@pytest.fixture
def listeners(tmp_path):
    """A Unix socket on the host's filesystem, an abstract one and a UDP port, all in this (the host's)
    process and network namespace; each yields what it received."""
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "host.sock"))
    unix.listen()
    abstract, name = socket.socket(socket.AF_UNIX), f"tunesmith-test-{secrets.token_hex(8)}"
    abstract.bind("\0" + name)
    abstract.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    yield {"path": str(tmp_path / "host.sock"), "name": name, "port": udp.getsockname()[1],
           "received": lambda: [_accepted(unix), _accepted(abstract), _datagram(udp)]}
    for s in (unix, abstract, udp):
        s.close()


def _accepted(server: socket.socket) -> bytes | None:
    server.settimeout(0.3)
    try:
        conn, _ = server.accept()
    except TimeoutError:
        return None
    with conn:
        conn.settimeout(0.3)
        return conn.recv(100)


def _datagram(server: socket.socket) -> bytes | None:
    server.settimeout(0.3)
    try:
        return server.recv(100)
    except TimeoutError:
        return None


def _attack(*attacks: str, **item) -> list:
    return run_python(ATTACKS, [({"output_text": "Paris"}, {"attack": a, "answer": "Paris", **item})
                                for a in attacks])


def test_no_socket_gets_out_and_a_benign_grader_still_scores(namespaces, listeners):
    """socket+connect to a Unix socket on the host's filesystem, an abstract one, UDP sendto, a raw socket,
    socketpair, and the socket module's path: each call fails in the grader, the listeners get nothing."""
    item = {k: listeners[k] for k in ("path", "name", "port")}
    attacks = ("benign", "filter_in_force", "unix_path", "unix_abstract", "udp_sendto", "raw", "socketpair",
               "io_uring", "socket_module", "benign")
    outcomes = _attack(*attacks, **item)
    out = dict(zip(attacks[:-1], outcomes[:-1], strict=True))
    assert listeners["received"]() == [None, None, None]
    assert (out["benign"].reward, out["benign"].error) == (1.0, None)
    assert (outcomes[-1].reward, outcomes[-1].error) == (1.0, None)  # rows after the refusals score as before
    assert (out["filter_in_force"].reward, out["filter_in_force"].error) == (1.0, None)
    for attack, call in [("unix_path", "socket"), ("unix_abstract", "socket"), ("udp_sendto", "socket"),
                         ("raw", "socket"), ("socketpair", "socketpair"), ("io_uring", "io_uring_setup")]:
        assert out[attack].reward == 0.0
        assert out[attack].error == f"PermissionError: [Errno 1] {call}: Operation not permitted", attack
    assert out["socket_module"].reward == 0.0 and out["socket_module"].error.startswith("PermissionError")


@pytest.mark.skipif(not X86_64, reason="x86_64's other ABIs (i386 through int 0x80, x32)")
def test_other_abis_cannot_go_around_the_filter(namespaces, listeners):
    """The i386 table (int 0x80 from 64-bit code: socket is 359 there, and socketcall exists) and x32 numbers
    are refused as a whole by the architecture check, not looked up in the x86_64 list."""
    x32, int80 = _attack("x32", "int80")
    assert x32.error == "PermissionError: [Errno 1] x32 socket: Operation not permitted"
    assert int80.error == "PermissionError: [Errno 1] int 0x80 socket: Operation not permitted"


@pytest.mark.skipif(not X86_64, reason="the i386 probe is x86_64 machine code")
def test_the_int80_attack_would_work_without_the_filter():
    """The attack above is real: the same code, in a process without the filter, gets a socket."""
    import subprocess
    import sys

    script = ATTACKS + "\nprint(int80_socket())"
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=30)
    if done.returncode:
        pytest.skip(f"this kernel runs no i386 system calls (ia32 emulation off): {done.stderr[-200:]}")
    assert int(done.stdout) >= 0


def test_the_grader_process_starts_no_process_or_thread(namespaces):
    """A fork loop through libc is refused at its first fork, whoever runs the server (RLIMIT_NPROC would not
    bound root's: as root here a loop under RLIMIT_NPROC 32 started 200); a thread is refused too."""
    fork_bomb, threads, after = _attack("fork_bomb", "threads", "benign")
    assert fork_bomb.error == "PermissionError: [Errno 1] fork after 0 processes: Operation not permitted"
    assert threads.reward == 0.0 and threads.error == "RuntimeError: can't start new thread"
    assert (after.reward, after.error) == (1.0, None)


def _run_filter(prog: list[tuple[int, int, int, int]], nr: int, arch: int) -> int:
    """What the classic BPF program answers for one system call (the instructions it uses only)."""
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == seccomp.LD_W_ABS:
            acc = {seccomp.NR: nr & 0xFFFFFFFF, seccomp.ARCH: arch}[k]
        elif code in (seccomp.JEQ, seccomp.JGE):
            taken = acc == k if code == seccomp.JEQ else acc >= k
            pc += jt if taken else jf
        elif code == seccomp.RET:
            return k
        else:
            raise AssertionError(f"unexpected instruction {code:#x}")
        pc += 1


REFUSED = {"x86_64": {"socket": 41, "connect": 42, "clone": 56, "fork": 57, "execve": 59, "kill": 62, "chmod": 90,
                      "fchmod": 91, "chown": 92, "truncate": 76, "link": 86, "symlink": 88, "ptrace": 101,
                      "setxattr": 188, "utimensat": 280, "tgkill": 234, "ioctl": 16, "mount": 165, "unshare": 272,
                      "io_uring_setup": 425, "clone3": 435, "pidfd_send_signal": 424, "fchmodat2": 452},
           "aarch64": {"socket": 198, "connect": 203, "clone": 220, "execve": 221, "kill": 129, "fchmodat": 53,
                       "fchownat": 54, "truncate": 45, "linkat": 37, "symlinkat": 36, "ptrace": 117, "setxattr": 5,
                       "utimensat": 88, "tgkill": 131, "ioctl": 29, "mount": 40, "unshare": 97, "clone3": 435}}


@pytest.mark.parametrize("arch", sorted(seccomp.NUMBERS))
def test_the_filter_program(arch):
    """An allow list: every allowed number passes, the calls a grader must not make are refused (sockets, new
    tasks, signals, ptrace, mode/owner/xattr/time changes, truncation by path, links, ioctl, mount, unshare), and
    any other ABI (i386 or AArch32, x32) is refused."""
    prog, native, numbers = seccomp.program(arch), seccomp.AUDIT_ARCH[arch], seccomp.NUMBERS[arch]
    named = {n for group in seccomp.ALLOWED.values() for n in group.split()}
    assert set(numbers) <= named and len(set(numbers.values())) == len(numbers)
    assert len(prog) == len(numbers) + 6
    assert all(_run_filter(prog, nr, native) == seccomp.ALLOW for nr in numbers.values())
    assert all(_run_filter(prog, nr, native) == seccomp.REFUSE for nr in REFUSED[arch].values())
    assert not set(REFUSED[arch]) & set(numbers)
    assert _run_filter(prog, 0x40000000 | 0, native) == seccomp.REFUSE  # x32's read
    read = numbers["read"]
    for foreign in (0x40000003, 0x40000028):  # AUDIT_ARCH_I386, AUDIT_ARCH_ARM
        assert _run_filter(prog, read, foreign) == _run_filter(prog, 102, foreign) == seccomp.REFUSE
    assert seccomp.REFUSE & 0xFFFF == errno.EPERM


HEADERS = {"x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
           "aarch64": Path("/usr/include/asm-generic/unistd.h")}  # aarch64 uses the generic table


@pytest.mark.parametrize("arch", sorted(seccomp.NUMBERS))
def test_numbers_match_the_kernel_headers(arch):
    header = HEADERS[arch]
    if not header.is_file():
        pytest.skip(f"{header} is not installed (linux-libc-dev)")
    text = header.read_text()
    found = {m.group(1): int(m.group(2)) for m in re.finditer(r"#define __NR(?:3264)?_(\w+)\s+(\d+)", text)}
    assert {name: found[name] for name in seccomp.NUMBERS[arch]} == seccomp.NUMBERS[arch]
    assert {name: found[name] for name in REFUSED[arch] if name in found} == {n: v for n, v in REFUSED[arch].items() if n in found}
    named = {n for group in seccomp.ALLOWED.values() for n in group.split()}
    assert {n for n in named if n in found} == set(seccomp.NUMBERS[arch])  # every allowed call the table has


def test_hosts_that_cannot_sandbox_are_refused(monkeypatch):
    """No namespaces, no Landlock, or no seccomp: a ConfigError before any grader runs, and the server does not
    start with python graders on (before its app or worker)."""
    from types import SimpleNamespace

    from tunesmith.serve.launch import serve_platform

    monkeypatch.setattr(sandbox, "namespaces", lambda: "unshare: write failed /proc/self/uid_map: Operation not permitted")
    with pytest.raises(ConfigError, match="namespaces cannot be built .*uid_map"):
        run_python("def grade(s, i):\n    return 1.0", [({}, {})])
    with pytest.raises(ConfigError, match="--no-python-graders"):
        serve_platform(SimpleNamespace(python_graders_on=True), "127.0.0.1", 0)
    monkeypatch.setattr(sandbox, "namespaces", lambda: None)
    monkeypatch.setattr(sandbox, "landlock_abi", lambda: 0)
    with pytest.raises(ConfigError, match="no Landlock"):
        sandbox.isolation()
    monkeypatch.setattr(sandbox, "landlock_abi", lambda: 7)
    monkeypatch.setattr(sandbox, "seccomp_refusal", lambda: "the seccomp filter cannot be installed: no")
    with pytest.raises(ConfigError, match="seccomp filter cannot be installed"):
        sandbox.isolation()


def test_the_seccomp_probe_of_this_host():
    """On x86_64 or aarch64 Linux the probe installs the filter and sees a socket refused."""
    if not seccomp.machine():
        assert "x86_64 or aarch64" in sandbox.seccomp_refusal()
    else:
        assert sandbox.seccomp_refusal() is None
        assert ctypes.sizeof(ctypes.c_void_p) == 8
