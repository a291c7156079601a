"""Copy a wheel without the native libraries a machine does not need, its RECORD rewritten to match.

bitsandbytes ships one ~20 MB library per CUDA and ROCm version (120 MB unpacked); a CUDA 13 machine
loads only ``libbitsandbytes_cuda130.so``. Usage: ``python scripts/slim_wheel.py WHEEL OUT_DIR KEEP...``
keeps the ``.so`` files whose names contain one of ``KEEP`` (and every other file).
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path


def slim(wheel: Path, out_dir: Path, keep: list[str]) -> Path:
    def wanted(name: str) -> bool:
        return not name.endswith(".so") or any(k in Path(name).name for k in keep)

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
    path = slim(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
    print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB")
