"""The python grader's sandbox: rewards, errors, limits, and what it refuses (network, files outside its
folder, the server's environment), checked both through Python and straight through libc with ctypes,
which no audit hook sees, so that the kernel's part (network namespace, Landlock) is tested too."""

from __future__ import annotations

import socket
import time

import pytest

from tunesmith.graders import Limits, check, grade_batch
from tunesmith.graders.run import Context
from tunesmith.graders.sandbox import isolation, landlock_abi, namespaces, run_python

SOURCE = '''
import ctypes, json, os, socket, struct

def grade(sample, item):
    kind = item["kind"]
    if kind == "exact":
        return 1.0 if sample["output_text"].strip() == item["answer"] else 0.0
    if kind == "json_f1":
        got, gold = set(sample["output_json"]), set(item["fields"])
        both = len(got & gold)
        return 2 * both / (len(got) + len(gold))
    if kind == "raise":
        raise ValueError("bad row")
    if kind == "not_a_number":
        return "high"
    if kind == "loop":
        while True:
            pass
    if kind == "allocate":
        return float(len(bytearray(4 * 1024 ** 3)))
    if kind == "read":
        return float(len(open(item["path"]).read()))
    if kind == "libc_read":  # no audit hook sees a raw open(2)
        return 1.0 if ctypes.CDLL(None).open(item["path"].encode(), 0) < 0 else 0.0
    if kind == "connect":
        socket.create_connection(("127.0.0.1", item["port"]), timeout=2)
        return 1.0
    if kind == "libc_connect":  # socket(2) + connect(2) through libc: refused by the kernel or not
        libc = ctypes.CDLL(None)
        fd = libc.socket(2, 1, 0)
        addr = struct.pack("<HH4s8x", 2, socket.htons(item["port"]), bytes([127, 0, 0, 1]))
        return 1.0 if fd < 0 or libc.connect(fd, addr, len(addr)) < 0 else 0.0
    if kind == "own_folder":
        with open("notes.txt", "w") as f:
            f.write("abc")
        return len(open("notes.txt").read()) / 4
    if kind == "big_file":
        with open("big.bin", "wb") as f:
            f.write(b"x" * (32 * 1024 * 1024))
        return 1.0
    if kind == "environment":
        return 1.0 if "TUNESMITH_SECRET" not in os.environ else 0.0
    if kind == "escape":  # fork(2) through libc, leave the session and linger
        libc = ctypes.CDLL(None)
        pid = libc.fork()
        if pid == 0:
            libc.setsid()
            libc.sleep(60)
            os._exit(0)
        return 1.0 if pid > 0 else 0.0
    if kind == "spawn":
        import subprocess
        subprocess.run(["true"])
        return 1.0
'''


NEEDS_LANDLOCK = pytest.mark.skipif(landlock_abi() < 1, reason="this kernel offers no Landlock: only the audit "
                                    "hook guards files here (docs/serve.md says so)")


@pytest.fixture(scope="module")
def listening_port():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield server.getsockname()[1]
    server.close()


def _run(rows, **limits):
    outcomes = run_python(SOURCE, [({"output_text": s}, item) for s, item in rows], Limits(**limits))
    return outcomes


def test_rewards_and_errors_row_by_row():
    import json

    g = check({"type": "python", "name": "f1", "source": SOURCE})
    rows = grade_batch(g, ["Paris", "Lyon", json.dumps({"a": 1, "b": 2}), "x", "x"],
                       [{"kind": "exact", "answer": "Paris"}, {"kind": "exact", "answer": "Paris"},
                        {"kind": "json_f1", "fields": ["a", "c"]}, {"kind": "raise"}, {"kind": "not_a_number"}])
    assert [r.reward for r in rows] == [1.0, 0.0, 0.5, 0.0, 0.0]  # F1 of {a, b} vs {a, c}: 2·1/4
    assert not rows[0].errored and rows[3].metadata["errors"]["python_grader_runtime_error"]
    assert rows[3].metadata["errors"]["python_grader_runtime_error_details"] == "ValueError: bad row"
    assert "finite number" in rows[4].metadata["errors"]["python_grader_runtime_error_details"]


def test_limits_stop_one_row_and_the_rest_go_on():
    rows = [("", {"kind": "loop"}), ("Paris", {"kind": "exact", "answer": "Paris"}), ("", {"kind": "allocate"}),
            ("Paris", {"kind": "exact", "answer": "Paris"})]
    loop, after_loop, allocate, last = _run(rows, cpu_s=1, wall_s=20, memory_mb=512)
    assert loop.reward == 0.0 and "CPU-time limit of 1 s" in loop.error
    assert after_loop.reward == 1.0 and last.reward == 1.0
    assert allocate.reward == 0.0 and allocate.error.startswith("MemoryError")
    [wall] = _run([("", {"kind": "loop"})], cpu_s=60, wall_s=1.5)
    assert "wall-clock limit of 1.5 s" in wall.error


@NEEDS_LANDLOCK
def test_files_outside_its_folder_are_refused(tmp_path):
    secret = tmp_path / "server-data.jsonl"
    secret.write_text("private")
    read, raw_read, own, big = _run([("", {"kind": "read", "path": str(secret)}),
                                     ("", {"kind": "libc_read", "path": str(secret)}), ("", {"kind": "own_folder"}),
                                     ("", {"kind": "big_file"})])
    assert read.reward == 0.0 and "own folder only" in read.error
    assert (raw_read.reward, raw_read.error) == (1.0, None)  # the kernel refused open(2) itself
    assert (own.reward, own.error) == (0.75, None)
    assert big.reward == 0.0 and "File too large" in big.error  # RLIMIT_FSIZE: 16 MiB


@NEEDS_LANDLOCK
def test_the_servers_environment_cannot_be_read_through_proc(monkeypatch):
    import os

    monkeypatch.setenv("TUNESMITH_SECRET", "sk-not-for-graders")
    path = f"/proc/{os.getpid()}/environ"  # this process plays the server
    read, raw_read = _run([("", {"kind": "read", "path": path}), ("", {"kind": "libc_read", "path": path})])
    assert read.reward == 0.0 and "PermissionError" in read.error
    assert (raw_read.reward, raw_read.error) == (1.0, None)


@pytest.mark.skipif(landlock_abi() < 4 and namespaces() is not None, reason="neither a network namespace nor "
                    "Landlock's TCP rules are available here: only the audit hook guards the network")
def test_network_and_processes_are_refused(listening_port):
    connect, raw_connect, spawn = _run([("", {"kind": "connect", "port": listening_port}),
                                        ("", {"kind": "libc_connect", "port": listening_port}),
                                        ("", {"kind": "spawn"})])
    assert connect.reward == 0.0 and "network" in connect.error
    assert (raw_connect.reward, raw_connect.error) == (1.0, None)  # connect(2) failed below Python
    assert spawn.reward == 0.0 and "PermissionError" in spawn.error


def _sandboxed_processes() -> list[str]:
    from pathlib import Path

    from tunesmith.graders.sandbox import CHILD

    out = []
    for proc in Path("/proc").iterdir():
        try:
            if str(CHILD).encode() in (proc / "cmdline").read_bytes():
                out.append(proc.name)
        except OSError:
            continue
    return out


def test_no_process_outlives_its_grader():
    """fork(2) through libc is refused by the seccomp filter (tests/test_graders_seccomp.py); the PID
    namespace, where there is one, would kill whatever got through with the grader."""
    [escape] = _run([("", {"kind": "escape"})])
    assert (escape.reward, escape.error) == (0.0, None)
    deadline = time.monotonic() + 5
    while _sandboxed_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _sandboxed_processes() == []


def test_the_server_environment_is_not_passed(monkeypatch):
    monkeypatch.setenv("TUNESMITH_SECRET", "sk-not-for-graders")
    [env] = _run([("", {"kind": "environment"})])
    assert (env.reward, env.error) == (1.0, None)


def test_a_grader_that_fails_to_load_fails_every_row():
    g = check({"type": "python", "name": "p", "source": "import no_such_module\ndef grade(s, i): return 1"})
    rows = grade_batch(g, ["a", "b"], [{}, {}], Context())
    assert all(r.reward == 0.0 and "no_such_module" in r.metadata["errors"]["python_grader_runtime_error_details"]
               for r in rows)


def test_isolation_in_force_is_reported():
    """The start line of a server that allows python graders says which kernel isolation is in force."""
    said = isolation()
    assert "user, mount, network and PID namespaces (read-only filesystem, a tmpfs folder, no capabilities)" in said
    assert f"Landlock ABI {landlock_abi()}" in said and "seccomp allow list" in said
