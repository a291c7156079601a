"""How the benchmarks time their ways and say where: the machine, timings' statistics, ways taken in alternating
blocks, and the repository at an earlier commit (a "before" side). Standard library only (and torch, when there, to
name the GPU), so that a GPU machine's kit runs it."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def machine() -> dict:
    """The CPUs, their model and the GPU, if any: what the numbers were measured on."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        gpu = None
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "gpu": gpu}


def stats(seconds: list[float]) -> dict:
    """Timings in ms: the median (what the table compares), the mean, p99 and the fastest."""
    xs = sorted(seconds)
    return {"n": len(xs), "p50_ms": round(statistics.median(xs) * 1000, 4), "mean_ms": round(statistics.mean(xs) * 1000, 4),
            "p99_ms": round(xs[max(0, int(len(xs) * 0.99) - 1)] * 1000, 4), "min_ms": round(xs[0] * 1000, 4)}


def alternating(ways: dict, n: int, block: int) -> dict[str, list[float]]:
    """Each of ``ways`` (name -> a function that does one and returns its seconds, or a tuple of them) called ``n``
    times, in blocks of ``block`` taken in turn (ABBA...: both see the same load, neither always goes first)."""
    out: dict[str, list] = {name: [] for name in ways}
    names = list(ways)
    for b in range(-(-n // block)):
        for name in names if b % 2 == 0 else names[::-1]:
            out[name] += [ways[name]() for _ in range(min(block, n - b * block))]
    return out


def counting(ways: dict) -> tuple[dict, dict[str, list]]:
    """``ways`` whose functions return (seconds, a count: tokens made, say) as functions that return the seconds (for
    :func:`alternating`), and the counts their calls returned, by way."""
    counts: dict[str, list] = {name: [] for name in ways}

    def seconds_of(name, fn):
        def run():
            seconds, n = fn()
            counts[name].append(n)
            return seconds
        return run

    return {name: seconds_of(name, fn) for name, fn in ways.items()}, counts


@contextmanager
def worktree(ref: str):
    """The repository at ``ref`` in a temporary folder (a git worktree, removed after): a server of an earlier commit
    runs from its ``src`` (``PYTHONPATH``) on this Python and its packages."""
    parent = Path(tempfile.mkdtemp(prefix="worktree-"))
    folder = parent / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(folder), ref], check=True,
                   capture_output=True)
    try:
        yield folder
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(folder)], capture_output=True)
        shutil.rmtree(parent, ignore_errors=True)
