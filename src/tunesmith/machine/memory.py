"""Measure a process's peak memory over one piece of work (Linux): reset the peak mark, run, read it."""

from __future__ import annotations

import ctypes
import gc


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def meminfo(key: str) -> int | None:
    """A line of ``/proc/meminfo`` (``MemTotal``, ``MemAvailable``) in bytes; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> int:
    """Free what can be freed, reset the kernel's peak-RSS mark (VmHWM); return the current RSS in bytes."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status("VmRSS")


def peak_rss() -> int:
    """Peak resident set size since the last :func:`reset_peak_rss` (or process start), in bytes."""
    return _status("VmHWM")
