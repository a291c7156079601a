"""A python grader cannot change the host: the attacks a deny list leaked, each made straight through libc
(no audit hook sees them) by the caller's code in the sandbox, and each checked from this process afterwards.

The host file is one this process (the server's user) owns, mode 0644, outside the grader's folder: a grader must
not truncate, chmod, chown it, set an extended attribute or its times, link or rename it, and must not signal or
trace any process (``kill(-1)``, ``ptrace``); all it may write is its folder, a tmpfs of ``Limits.folder_mb``.
Each attack runs twice: in the whole sandbox as this host builds it, and with only its inner layers (Landlock,
the seccomp allow list, the audit hook), so that the allow list is shown to hold by itself on a kernel whose
Landlock governs none of these calls.
"""

from __future__ import annotations

import errno
import os

import pytest

from tunesmith.graders import Limits, sandbox
from tunesmith.graders.sandbox import landlock_abi, namespaces, run_python

ATTACKS = r'''
import ctypes, errno, os

libc = ctypes.CDLL(None, use_errno=True)

def refused(result):
    """1.0 when the call failed (its errno as the reward's detail is in the error), else an error naming it."""
    if result >= 0:
        raise RuntimeError(f"the call succeeded ({result})")
    raise PermissionError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))

def grade(sample, item):
    kind, path = item["kind"], item.get("path", "").encode()
    if kind == "truncate":
        return refused(libc.truncate(path, ctypes.c_long(0)))
    if kind == "open_truncate":
        return refused(libc.open(path, os.O_WRONLY | os.O_TRUNC))
    if kind == "chmod":
        return refused(libc.chmod(path, 0o777))
    if kind == "chown":
        return refused(libc.chown(path, 65534, 65534))
    if kind == "xattr":
        return refused(libc.setxattr(path, b"user.tunesmith", b"x", 1, 0))
    if kind == "utime":
        return refused(libc.utimes(path, None))
    if kind == "link_out":
        open("mine.txt", "w").write("x")
        return refused(libc.link(b"mine.txt", item["to"].encode()))
    if kind == "link_in":
        return refused(libc.link(path, b"linked.txt"))
    if kind == "rename_out":
        open("mine.txt", "w").write("x")
        return refused(libc.rename(b"mine.txt", item["to"].encode()))
    if kind == "rename_in":
        return refused(libc.rename(path, b"taken.txt"))
    if kind == "kill_all":
        return refused(libc.kill(-1, 0))  # signal 0: the permission check of kill(-1, SIGKILL), with no harm
    if kind == "kill_parent":
        return refused(libc.kill(os.getppid(), 0))
    if kind == "ptrace":
        return refused(libc.ptrace(16, os.getppid(), None, None))  # PTRACE_ATTACH
    if kind == "fill":  # 16 MB files until something stops it
        written = 0
        for i in range(40):
            with open(f"fill{i}.bin", "wb") as f:
                for _ in range(16):
                    f.write(b"x" * (1024 * 1024))
                    written += 1
        raise RuntimeError(f"wrote {written} MB")
    if kind == "wait":
        import time
        time.sleep(item["seconds"])
        return 1.0
    raise ValueError(kind)
'''

MODES = [pytest.param(True, id="sandbox", marks=pytest.mark.skipif(namespaces() is not None, reason=(
    f"the grader's namespaces cannot be built here: {namespaces()}"))),
         pytest.param(False, id="inner-layers", marks=pytest.mark.skipif(landlock_abi() < 1, reason=(
             "no Landlock here: python graders are refused")))]
# what refused each attack: the kernel's answer (EPERM: the seccomp allow list; EROFS: the read-only mounts;
# EACCES: Landlock), any of which holds
REFUSALS = {errno.EPERM, errno.EROFS, errno.EACCES, errno.EXDEV}


@pytest.fixture(params=MODES)
def layers(request, monkeypatch):
    if not request.param:
        monkeypatch.setattr(sandbox, "NAMESPACED", False)
    return request.param


@pytest.fixture
def host_file(tmp_path):
    path = tmp_path / "server-owned.txt"
    path.write_text("the server's data\n")
    path.chmod(0o644)
    return path


def state(path) -> tuple:
    st = os.stat(path)
    return st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_nlink, os.listxattr(path)


@pytest.mark.parametrize("kind", ["truncate", "open_truncate", "chmod", "chown", "xattr", "utime", "link_out",
                                  "link_in", "rename_out", "rename_in", "kill_all", "kill_parent", "ptrace"])
def test_an_attack_on_the_host_is_refused_and_changes_nothing(layers, host_file, tmp_path, kind):
    before, listing = state(host_file), sorted(os.listdir(tmp_path))
    item = {"kind": kind, "path": str(host_file), "to": str(tmp_path / "dropped.txt")}
    [row] = run_python(ATTACKS, [({"output_text": ""}, item)], Limits(wall_s=20))
    assert row.reward == 0.0 and row.error, row
    assert row.error.startswith("PermissionError: [Errno"), row.error  # the call failed, not the grader
    code = int(row.error.split("[Errno ")[1].split("]")[0])
    assert code in REFUSALS, row.error
    if not layers:  # the inner layers alone: the allow list refuses these calls; opening and renaming are Landlock's
        assert code == errno.EPERM or (kind in ("open_truncate", "rename_out", "rename_in")
                                       and code in (errno.EACCES, errno.EXDEV)), row.error
    assert state(host_file) == before and sorted(os.listdir(tmp_path)) == listing
    assert host_file.read_text() == "the server's data\n"


def sandbox_capabilities() -> dict[int, dict[str, int]]:
    """pid -> the capability sets (CapInh, CapPrm, CapEff, CapBnd, CapAmb) of every Python process of a sandbox
    (the relay and the grader; not the ``unshare`` that waits for them outside), read here."""
    out = {}
    for proc in os.listdir("/proc"):
        try:
            argv = open(f"/proc/{proc}/cmdline", "rb").read().split(b"\0") if proc.isdigit() else []
            if str(sandbox.CHILD).encode() not in argv or os.path.basename(argv[0]) == b"unshare":
                continue
            caps = {line.split(":")[0]: int(line.split()[1], 16) for line in open(f"/proc/{proc}/status")
                    if line.startswith("Cap")}
        except OSError:
            continue
        out[int(proc)] = caps
    return out


def test_all_a_grader_may_write_is_its_folder_and_it_holds_no_capability():
    """Many 16 MB files end at the folder's tmpfs; the relay and the grader, root in their namespace, hold no
    capability (read from this process while the grader runs)."""
    import threading
    import time

    if namespaces() is not None:
        pytest.skip(f"the grader's namespaces cannot be built here: {namespaces()}")
    [fill] = run_python(ATTACKS, [({"output_text": ""}, {"kind": "fill"})], Limits(wall_s=60, folder_mb=48))
    assert fill.reward == 0.0 and "No space left on device" in fill.error, fill
    rows: list = []
    runner = threading.Thread(target=lambda: rows.extend(run_python(ATTACKS, [({"output_text": ""},
                                                                               {"kind": "wait", "seconds": 3})])))
    runner.start()
    seen: dict = {}
    deadline = time.monotonic() + 10
    while len(seen) < 2 and time.monotonic() < deadline:  # the relay and the grader process
        seen.update(sandbox_capabilities())
        time.sleep(0.1)
    runner.join(30)
    assert rows and rows[0].reward == 1.0, rows
    assert len(seen) >= 2, f"the relay and the grader process were not both seen: {seen}"
    assert all(value == 0 for caps in seen.values() for value in caps.values()), seen
