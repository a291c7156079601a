"""The jobs worker's stop on SIGTERM: a flag a signal handler may set, and a watchdog that ends a worker
whose shutdown hangs (its threads' stacks go to its log), so a killed server never leaves a worker behind."""

import signal
import subprocess
import sys
import time

from tunesmith.serve.engines.process import StopFlag

HANGS_AFTER_SIGTERM = """
import threading, sys
import tunesmith.serve.engines.process as w
w.STOP_GRACE_S = 1
w.stop_on_sigterm(w.SHUTDOWN, open(sys.argv[1], "a"))
print("ready", flush=True)
lock = threading.Lock()
lock.acquire()
lock.acquire()  # a shutdown that never finishes
"""


def test_stop_flag_set_by_a_signal_ends_a_wait_at_once():
    flag = StopFlag()
    old = signal.signal(signal.SIGALRM, lambda *_: flag.set())
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        started = time.monotonic()
        assert flag.wait(10) is True
        assert time.monotonic() - started < 2
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert StopFlag().wait(0.05) is False


def test_a_worker_hung_after_sigterm_dumps_its_stacks_and_exits(tmp_path):
    log = tmp_path / "worker.log"
    proc = subprocess.Popen([sys.executable, "-c", HANGS_AFTER_SIGTERM, str(log)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        assert proc.poll() is None, "the process should hang until its SIGTERM"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20)
    finally:
        proc.kill()
    assert rc != 0
    dump = log.read_text()
    assert "most recent call first" in dump and "<string>" in dump, dump
