"""The jobs worker process, whichever executor it runs (this process, or Ray): its command line, its log, and
its stop on SIGTERM (a flag a signal handler may set, and a watchdog that ends a worker whose shutdown hangs).
``tunesmith serve`` starts ``python -m tunesmith.serve.jobs.worker`` or ``python -m tunesmith.serve.jobs.ray_executor``."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import time
from pathlib import Path


class StopFlag:
    """A stop request that a signal handler may set: a plain attribute, no lock. (``threading.Event.set``
    takes the lock that ``Event.wait`` holds for a few bytecodes; a handler run in that window, on the same
    main thread, would wait on it forever.)"""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while not self._set and (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))
        return self._set



SHUTDOWN = StopFlag()  # set by SIGTERM: the running job stops at the next step with a checkpoint



STOP_GRACE_S = 15  # after SIGTERM: a worker still alive then writes its threads' stacks to its log and exits



def stop_on_sigterm(flag, log_file) -> None:
    """SIGTERM sets ``flag`` (the job saves a checkpoint at its next step) and arms a watchdog: a worker
    not gone ``STOP_GRACE_S`` later — a save that hangs, a library thread that never returns — dumps every
    thread's stack to ``log_file`` and exits; its job resumes from its newest complete checkpoint."""

    def handler(*_):
        flag.set()
        faulthandler.dump_traceback_later(STOP_GRACE_S, exit=True, file=log_file)

    signal.signal(signal.SIGTERM, handler)


JOBS_ENGINES = ("auto", "builtin", "vllm")  # where a job generates on a vLLM server (tunesmith.serve.jobs.worker.engine_of)


def start_worker_process(description: str, ray: bool = False) -> tuple[argparse.Namespace, object]:
    """The worker's arguments, its log (``<data-dir>/worker.log``) and its SIGTERM handler set up; returns the
    arguments and the log file the watchdog writes to."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--jobs-per-key", type=int, default=1, help="most jobs of one API key running at once")
    if ray:
        ap.add_argument("--ray-address", default=None, help="a running Ray cluster (default: start a local one)")
    else:
        ap.add_argument("--once", action="store_true", help="exit when the queue is empty")
        ap.add_argument("--gpu-budget-gb", type=float, default=None,
                        help="the jobs' share of a GPU that vLLM serves on (tunesmith.serve.engines.gpu_split)")
        ap.add_argument("--vllm-endpoint", type=Path, default=None,
                        help="the server's vLLM (its endpoint file): jobs may evaluate and sample there")
        ap.add_argument("--jobs-engine", choices=JOBS_ENGINES, default="auto",
                        help="with --vllm-endpoint, where a job generates: the engine measured faster on this device "
                             "for each use (auto), the job's own process (builtin) or the server's vLLM (vllm)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(filename=args.data_dir / "worker.log", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    watchdog_log = open(args.data_dir / "worker.log", "a")  # noqa: SIM115 - kept open for the watchdog's dump
    stop_on_sigterm(SHUTDOWN, watchdog_log)
    return args, watchdog_log


def end_worker_process() -> None:
    """Exit now: everything is in the store and the checkpoints, and a library thread left running must not
    keep the process alive after SIGTERM."""
    logging.shutdown()
    os._exit(0)


def die_with_parent() -> None:
    """Linux: a child the server starts (the jobs worker, a vLLM server) gets SIGTERM when the server dies, so a
    killed server leaves no orphan training or serving beside the one the restarted server starts."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
