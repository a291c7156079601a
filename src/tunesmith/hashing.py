"""The one content hasher: what decides a cache key, a training's fingerprint or a downloaded file's checksum."""

from __future__ import annotations

import hashlib
from pathlib import Path


def update_with(h, path: Path) -> None:
    """Feed ``path`` into the hash ``h``: a file's bytes, or a folder's files (each one's relative name, then its
    bytes, in name order), read a megabyte at a time."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f != path:
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)


def content_hash(path: Path) -> str:
    """sha256 of a file (the checksum a package index publishes), or of a folder's names and bytes."""
    h = hashlib.sha256()
    update_with(h, path)
    return h.hexdigest()
