"""Several training processes (torchrun): who does what, and how ``--nproc`` starts them.

``tunesmith train|run RECIPE --nproc N`` re-runs the same command under ``torchrun`` (the
``torch.distributed.run`` module of the installed torch); a user who runs ``torchrun ... -m tunesmith
train RECIPE`` gets the same behaviour, because everything below reads torchrun's environment
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``). Rank 0 prepares the data (under a file lock, the other
ranks wait), writes every report, progress line and checkpoint, and evaluates; the recipe's batch
(``train.batch_size`` x ``train.grad_accum``) is the global batch, shared by the ranks, so a run
resumed with another number of processes continues at the same step and data position.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

from tunesmith.errors import ConfigError

LAUNCH_OPTIONS = ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True in a single process and on global rank 0 of a multi-process launch."""
    return rank() == 0


def init_process_group() -> None:
    """Join torchrun's process group once (gloo on CPU, nccl with one GPU per rank); the Trainer reuses it."""
    import torch
    import torch.distributed as dist

    if world_size() <= 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per rank, as the Trainer does
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        init_process_group()
        dist.barrier()


def finish() -> None:
    """Leave the process group at the end of a command (no collective may follow)."""
    if world_size() > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def main_process_first():
    """Rank 0 runs the block first and the other ranks after it (they then find its cached work instead
    of doing the same at the same time)."""
    if world_size() <= 1:
        yield
        return
    main = is_main()
    if not main:
        barrier()
    yield
    if main:
        barrier()


@contextmanager
def file_lock(path: Path):
    """An exclusive lock on ``path`` (created if missing): one process at a time on this file system,
    also across separate launches that share the run folder."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def share_batch(batch_size: int, grad_accum: int, processes: int) -> tuple[int, int]:
    """Each rank's (micro-batch, accumulation steps) so that all ranks together take the recipe's global
    batch ``batch_size x grad_accum`` per optimizer step: the accumulation steps are divided first (each
    rank keeps the recipe's micro-batch and memory), then the micro-batch."""
    if processes <= 1:
        return batch_size, grad_accum
    if grad_accum % processes == 0:
        return batch_size, grad_accum // processes
    total = batch_size * grad_accum
    if total % processes:
        raise ConfigError(f"train.batch_size x train.grad_accum = {total} is the global batch, shared by the "
                          f"{processes} training processes; make it a multiple of {processes}")
    per_rank = total // processes
    accum = next(a for a in range(min(grad_accum, per_rank), 0, -1) if per_rank % a == 0)
    return per_rank // accum, accum


def launched() -> bool:
    """True inside a torchrun worker (then ``--nproc`` was handled by the launcher)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def torchrun_command(args: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0,
                     rdzv_endpoint: str | None = None) -> list[str]:
    """The ``torchrun`` command line that runs ``tunesmith <args>`` in ``nproc`` processes on this node
    (``args`` without our launch options). One node rendezvous on a free local port (``--standalone``);
    several nodes meet at ``rdzv_endpoint`` (HOST:PORT of node 0) with the c10d rendezvous."""
    if nproc < 1 or nnodes < 1:
        raise ConfigError("--nproc and --nnodes must be at least 1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        if not rdzv_endpoint:
            raise ConfigError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT (the address of node 0)")
        cmd += ["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--rdzv_backend", "c10d",
                "--rdzv_endpoint", rdzv_endpoint, "--rdzv_id", "tunesmith"]
    return [*cmd, "-m", "tunesmith", *args]


def strip_launch_options(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` and the other launch options (``--opt N`` and ``--opt=N`` forms)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in LAUNCH_OPTIONS:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def launch(argv: list[str], nproc: int, nnodes: int, node_rank: int, rdzv_endpoint: str | None) -> int:
    """Run ``tunesmith <argv>`` under torchrun and return its exit status (the ranks print for themselves)."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    cmd = torchrun_command(strip_launch_options(argv), nproc, nnodes, node_rank, rdzv_endpoint)
    return subprocess.run(cmd, env=env, check=False).returncode
