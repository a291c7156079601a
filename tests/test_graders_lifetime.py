"""A python grader never outlives the process that started it, checked from outside as an attacker on the
host would: a real ``tunesmith serve`` (or a process calling the sandbox) starts graders that sleep or shrug
off signals, the test kills or stops that process, and then reads ``/proc`` for every process of each
sandbox (``unshare``, the relay, the grader: found by walking the process tree down from the server, each
known by its pid and start time, so a reused pid is not mistaken for a survivor)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import openai
import pytest

from tunesmith.graders.sandbox import CHILD, RELAY_GRACE_S, Limits, refusal, run_python
from tunesmith.serve.engines.process import STOP_GRACE_S

from .conftest import banking_rows, http_get

pytestmark = pytest.mark.skipif(refusal() is not None, reason=f"python graders are refused here: {refusal()}")

GONE_S = 2.0  # docs/serve.md: a grader's processes are gone within this once the process that started it is killed

SLEEPER = "import time\n\ndef grade(sample, item):\n    time.sleep(240)\n    return 1.0\n"
STUBBORN = textwrap.dedent('''
    import ctypes, signal, time

    def grade(sample, item):
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGPIPE, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
        libc = ctypes.CDLL(None)
        if libc.fork() == 0:  # refused by the seccomp filter; a child that got through would linger too
            libc.setsid()
        ctypes.CDLL(None).prctl(1, 0)  # PR_SET_PDEATHSIG: none
        while True:
            time.sleep(1)
''')
LOADS_FOREVER = "import time\ntime.sleep(240)\n\ndef grade(sample, item):\n    return 1.0\n"


# --- the process table, read as anyone on the host can --------------------------------------------------------

def _table() -> dict[int, tuple[int, str, int, bytes]]:
    """pid -> (parent pid, state, start time, command line) of every process."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path("/proc", name, "stat").read_text()
            cmdline = Path("/proc", name, "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(name)] = (int(fields[1]), fields[0], int(fields[19]), cmdline)
    return out


def _sandboxes(root: int) -> list[set[tuple[int, int]]]:
    """The sandboxes below ``root``: for each, (pid, start time) of its processes, from the top one that runs
    the sandbox's script (``unshare``, or the relay itself) down to the grader and anything it started."""
    table, child = _table(), str(CHILD).encode()
    below, i = [root], 0
    while i < len(below):
        below += [pid for pid, row in table.items() if row[0] == below[i]]
        i += 1
    tops = [pid for pid in below[1:] if child in table[pid][3] and child not in table[table[pid][0]][3]]
    out = []
    for top in tops:
        tree, i = [top], 0
        while i < len(tree):
            tree += [pid for pid, row in table.items() if row[0] == tree[i]]
            i += 1
        out.append({(pid, table[pid][2]) for pid in tree if pid in table})
    return out


def _alive(processes: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """Those still running: present with the same start time and not a zombie (an ended process whose parent
    has not yet read its status)."""
    table = _table()
    return {(pid, start) for pid, start in processes if pid in table and table[pid][2] == start
            and table[pid][1] not in "ZX"}


def _loading(root: int) -> set[tuple[int, int]]:
    """The sandbox below ``root`` once its grader process exists (it is loading its source)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if found := [s for s in _sandboxes(root) if len(s) >= 3]:
            return found[0]
        time.sleep(0.02)
    raise AssertionError("no grader process started")


def _grading(root: int, count: int, timeout: float) -> list[set[tuple[int, int]]]:
    """Wait for ``count`` sandboxes below ``root`` whose grader process has started (three processes each:
    ``unshare``, the relay, the grader), then a moment for the graders to reach ``grade``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [s for s in _sandboxes(root) if len(s) >= 3]
        if len(found) >= count:
            time.sleep(1.0)
            return _sandboxes(root)
        time.sleep(0.1)
    raise AssertionError(f"no {count} running grader(s) below pid {root} within {timeout:g} s: {_sandboxes(root)}")


def _kill_left(processes: set[tuple[int, int]]) -> None:
    """A failed test leaves nothing behind: SIGKILL whichever of ``processes`` still runs."""
    for pid, _ in _alive(processes):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _command(cmdline: bytes) -> str:
    return cmdline.replace(b"\0", b" ")[:120].decode(errors="replace")


def _gone_within(processes: set[tuple[int, int]], bound: float) -> float:
    """Seconds until none of ``processes`` runs; AssertionError naming the survivors past ``bound``."""
    start = time.monotonic()
    while (left := _alive(processes)) and time.monotonic() - start < bound:
        time.sleep(0.01)
    table = _table()
    assert not left, f"still running {bound:g} s on: " + "; ".join(
        f"{pid} {_command(table[pid][3])}" for pid, _ in left if pid in table)
    return time.monotonic() - start


# --- a real server, as a user starts it -----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model: Path, data_dir: Path, log) -> tuple[subprocess.Popen, str]:
    port, exe = _free_port(), Path(sys.executable).with_name("tunesmith")
    proc = subprocess.Popen([str(exe), "serve", "--model", str(model), "--data-dir", str(data_dir), "--port", str(port),
                             "--allow-python-graders"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "TUNESMITH_API_KEYS": "k,k2"})
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if http_get(f"http://127.0.0.1:{port}/v1/models", "k", timeout=5)[0] == 200:
                return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:  # not listening yet
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not come up within 120 s")


def _post_in_background(url: str, key: str, source: str) -> threading.Thread:
    """POST /v1/fine_tuning/alpha/graders/run with a python grader; it never answers: its server is killed."""
    def run():
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=300)
        try:
            client.fine_tuning.alpha.graders.run(grader={"type": "python", "name": "g", "source": source},
                                                 model_sample="x")
        except openai.APIError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    server.wait()


def _reinforcement_job(url: str, model: Path, source: str) -> None:
    """A reinforcement job whose python grader is ``source`` (the jobs worker starts it after its first rollouts)."""
    c = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
    rows = banking_rows(("card_arrival", "pin_blocked"), 2)
    lines = "".join(json.dumps({"messages": [{"role": "user", "content": r["text"]}], "category": r["category"]})
                    + "\n" for r in rows).encode()
    train = c.files.create(file=("train.jsonl", lines), purpose="fine-tune")
    c.fine_tuning.jobs.create(model=str(model), training_file=train.id, seed=1, method={
        "type": "reinforcement", "reinforcement": {
            "grader": {"type": "python", "name": "sleeper", "source": source},
            "hyperparameters": {"n_epochs": 1, "batch_size": 2, "compute_multiplier": 0.5}}})


def _worker(server: subprocess.Popen) -> int:
    [pid] = [pid for pid, row in _table().items() if row[0] == server.pid and b"tunesmith.serve.jobs.worker" in row[3]]
    return pid


def test_graders_die_with_a_killed_server(tmp_path, tiny_model_dir):
    """SIGKILL of ``tunesmith serve`` while two graders run in it, one asleep, one ignoring every catchable
    signal and trying to fork: within :data:`GONE_S` no process of either sandbox is left. The grader of a
    reinforcement job running in its jobs worker ends with the worker, which stops within its grace
    (:data:`STOP_GRACE_S`) of the server's end."""
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    server, url = _serve(tiny_model_dir, tmp_path / "data", log)
    served: set[tuple[int, int]] = set()
    job: set[tuple[int, int]] = set()
    try:
        _reinforcement_job(url, tiny_model_dir, SLEEPER)
        [job] = _grading(_worker(server), 1, timeout=300)
        for key, source in (("k", SLEEPER), ("k2", STUBBORN)):  # a key runs one grader at a time
            _post_in_background(url, key, source)
        served = set().union(*_grading(server.pid, 3, timeout=60)) - job
        assert len(served) >= 6  # unshare, relay and grader, twice
        server.send_signal(signal.SIGKILL)
        seconds = _gone_within(served, GONE_S)
        print(f"the server's graders ({len(served)} processes) were gone {seconds:.3f} s after its SIGKILL")
        seconds = _gone_within(job, STOP_GRACE_S + GONE_S)
        print(f"the job's grader ({len(job)} processes) was gone {seconds:.3f} s after that")
    finally:
        server.kill()
        server.wait()
        _kill_left(served | job)
        log.close()


def test_a_reinforcement_jobs_grader_dies_with_a_killed_worker(tmp_path, tiny_model_dir):
    """A reinforcement job's python grader, started by the jobs worker: SIGKILL of the worker (the server
    lives on) leaves no process of the grader's sandbox within :data:`GONE_S`."""
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    server, url = _serve(tiny_model_dir, tmp_path / "data", log)
    sandbox: set[tuple[int, int]] = set()
    try:
        _reinforcement_job(url, tiny_model_dir, STUBBORN)
        worker = _worker(server)
        [sandbox] = _grading(worker, 1, timeout=300)
        os.kill(worker, signal.SIGKILL)
        seconds = _gone_within(sandbox, GONE_S)
        print(f"the job's grader ({len(sandbox)} processes) was gone {seconds:.3f} s after the worker's SIGKILL")
        assert server.poll() is None
    finally:
        _stop(server)
        _kill_left(sandbox)
        log.close()


# --- each way a grader learns of its server's end, alone ----------------------------------------------------------

ALONE = textwrap.dedent('''
    import os, sys, threading, time
    from tunesmith.graders import sandbox
    if sys.argv[2] == "pipe":  # no parent-death signal: only the relay's watch of its stdin is left
        sandbox.die_with_parent = lambda parent: None
    else:  # a child forked without exec holds every pipe of this process: only the parent-death signal is left
        def fork_later():
            time.sleep(1)
            if os.fork() == 0:
                time.sleep(120)
                os._exit(0)
        threading.Thread(target=fork_later, daemon=True).start()
    sandbox.run_python(sys.argv[1], [({"output_text": "x"}, {})])
''')


@pytest.mark.parametrize("alone", ["pipe", "death_signal"])
def test_each_way_alone_ends_the_grader_with_its_killed_server(alone):
    """A process running a grader (the server's side of :mod:`tunesmith.graders.sandbox`) is SIGKILLed with
    one of the two ways taken away: the relay's watch of its stdin (a forked child keeps the pipe open) or the
    parent-death signal; the other alone leaves no process of the sandbox within :data:`GONE_S`."""
    driver = subprocess.Popen([sys.executable, "-c", ALONE, STUBBORN, alone])
    sandbox: set[tuple[int, int]] = set()
    holders: list[int] = []
    try:
        [sandbox] = _grading(driver.pid, 1, timeout=60)
        time.sleep(0.5)  # the holder forked
        holders = [pid for pid, row in _table().items() if row[0] == driver.pid and ALONE.encode() in row[3]]
        assert len(holders) == (alone == "death_signal")
        driver.kill()
        seconds = _gone_within(sandbox, GONE_S)
        print(f"{alone} alone: the grader's {len(sandbox)} processes were gone {seconds:.3f} s after the SIGKILL")
    finally:
        driver.kill()
        driver.wait()
        for pid in holders:
            os.kill(pid, signal.SIGKILL)
        _kill_left(sandbox)


# --- a stopped server: the relay's own clock --------------------------------------------------------------------

DRIVER = textwrap.dedent('''
    import json, sys
    from tunesmith.graders import sandbox
    sandbox.STARTUP_S = float(sys.argv[2])
    rows = [({"output_text": "x"}, {})]
    out = sandbox.run_python(sys.argv[1], rows, sandbox.Limits(wall_s=float(sys.argv[2])))
    print(json.dumps([o.error for o in out]))
''')


@pytest.mark.parametrize(("source", "said"), [(SLEEPER, "wall-clock limit of 2 s"), (STUBBORN, "wall-clock limit of 2 s"),
                                              (LOADS_FOREVER, "longer than 2 s to load its source")])
def test_a_stopped_servers_grader_ends_at_the_relays_wall_clock(source, said):
    """A process running graders (the server's side of :mod:`tunesmith.graders.sandbox`, limits of 2 s) is
    stopped with SIGSTOP: it can neither time nor kill anything, and its death signals do not come, yet the
    grader and its relay end at the relay's own clock; the relay's reason is waiting for it when it goes on."""
    wall_s = 2.0
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, source, f"{wall_s:g}"], stdout=subprocess.PIPE, text=True)
    sandbox: set[tuple[int, int]] = set()
    try:
        sandbox = _loading(driver.pid)
        if source != LOADS_FOREVER:
            time.sleep(0.5)  # into grade()
        driver.send_signal(signal.SIGSTOP)
        table = _table()
        relay_and_grader = {(pid, start) for pid, start in sandbox if not table[pid][3].split(b"\0")[0].endswith(b"unshare")}
        assert len(relay_and_grader) == 2 and _alive(relay_and_grader) == relay_and_grader
        _gone_within(relay_and_grader, wall_s + GONE_S)
        assert _table()[driver.pid][1] == "T"  # the server was stopped all along
        driver.send_signal(signal.SIGCONT)
        out, _ = driver.communicate(timeout=60)
        [error] = json.loads(out)
        assert said in error
    finally:
        driver.kill()
        driver.wait()
        _kill_left(sandbox)


def test_the_relay_waits_for_the_next_row_no_longer_than_the_wall_clock(tmp_path):
    """A stand-in server that starts the relay, reads its ready line and then sends nothing (as a server stopped
    between two rows): the relay says why and ends the grader after ``--wall-s``, and exits."""
    (tmp_path / "grader.py").write_text(SLEEPER)
    proc = subprocess.Popen(["unshare", "-rmn", "--pid", "--fork", "--kill-child", sys.executable, "-I", str(CHILD),
                             "--folder-mb", "8", "--wall-s", "2", "--startup-s", "20"], cwd=tmp_path,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    sandbox: set[tuple[int, int]] = set()
    try:
        assert json.loads(proc.stdout.readline())["ready"] is True
        start = time.monotonic()
        [sandbox] = _sandboxes(os.getpid())
        assert len(_alive(sandbox)) == 3  # unshare, the relay, the grader
        ended = json.loads(proc.stdout.readline())["ended"]
        assert "waited more than 2 s for the server's next row" in ended
        assert 1.5 < time.monotonic() - start < 2 + GONE_S
        _gone_within(sandbox, GONE_S)
        assert proc.wait(GONE_S) == 0
    finally:
        proc.kill()
        proc.wait()
        _kill_left(sandbox)


def test_a_grader_that_stops_reading_its_rows_cannot_hold_the_relay():
    """A grader that answers its first row and then keeps its rows pipe open but reads elsewhere: the relay's
    write of a row larger than the pipe's buffer would block for good; it is bounded by the row's wall clock
    like the rest, and the relay, not the server's later backstop, answers."""
    source = textwrap.dedent('''
        import fcntl, os, stat

        def grade(sample, item):
            for fd in range(3, 64):  # the one read-only pipe: the rows from the relay
                try:
                    if stat.S_ISFIFO(os.fstat(fd).st_mode) and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == 0:
                        os.dup(fd)  # the relay's rows keep a reader...
                        os.dup2(os.pipe()[0], fd)  # ...that never reads them
                        return 1.0
                except OSError:
                    pass
            return 0.0
    ''')
    start = time.monotonic()
    first, second = run_python(source, [({"output_text": "x"}, {}), ({"output_text": "y" * 1_000_000}, {})],
                               Limits(wall_s=2))
    assert (first.reward, first.error) == (1.0, None)
    assert "wall-clock limit of 2 s" in second.error
    assert time.monotonic() - start < 2 + RELAY_GRACE_S - 1  # answered by the relay, at its own deadline
