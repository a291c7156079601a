"""Copy a wheel without the files a machine does not need, its RECORD rewritten to match.

bitsandbytes ships one ~20 MB library per CUDA and ROCm version (120 MB unpacked); a CUDA 13 machine
loads only ``libbitsandbytes_cuda130.so``. Unsloth's wheel is 28 MB, 26 of them its ``studio/`` web app,
which training never imports. Usage:

    python scripts/slim_wheel.py WHEEL OUT_DIR [--keep-so SUBSTR ...] [--drop PREFIX ...]

``--keep-so`` keeps only the ``.so`` files whose names contain one of the substrings (without it, every
``.so``); ``--drop`` removes the files whose paths start with one of the prefixes.
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path


def slim(wheel: Path, out_dir: Path, keep_so: list[str] | None = None, drop: list[str] = ()) -> Path:
    """A copy of ``wheel`` in ``out_dir`` without the unwanted files, its RECORD listing only what is left."""
    def wanted(name: str) -> bool:
        if any(name.startswith(p) for p in drop):
            return False
        return keep_so is None or not name.endswith(".so") or any(k in Path(name).name for k in keep_so)

    out = out_dir / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if not wanted(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(line for line in lines if wanted(line.split(",")[0])) + "\n").encode()
            dst.writestr(info, data)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheel", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--keep-so", nargs="+", default=None)
    ap.add_argument("--drop", nargs="+", default=[])
    a = ap.parse_args()
    path = slim(a.wheel, a.out_dir, a.keep_so, a.drop)
    print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB")
