"""Which GPU kinds tunesmith's fast training path has been verified on: ``gpu_verified.json`` beside this module,
written by ``scripts/gpu_run.sh verify`` (the fast path's losses equal to the reference path's, and its speed, on
that GPU) and read by :func:`tunesmith.machine.device.probe`. Until a GPU kind has a record, ``train.path: auto``
trains on the reference path (plain TRL) there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

RECORDS = Path(__file__).with_name("gpu_verified.json")


def records(path: Path | None = None) -> dict[str, dict]:
    """GPU name (as torch names it) -> its record; empty when there is no file."""
    try:
        return json.loads((path or RECORDS).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def verification(device_name: str, path: Path | None = None) -> tuple[bool, str | None]:
    """``(verified, finding)`` for a GPU kind: verified when the fast path's losses equalled the reference path's
    there and it was not slower; else what its record found (None without a record)."""
    record = records(path).get(device_name)
    if not record:
        return False, None
    if record.get("loss_equal") and (record.get("speedup") or 1.0) >= 1.0:
        return True, None
    return False, record.get("finding") or (f"measured {record['date']}: losses equal {record['loss_equal']}, "
                                            f"speed-up {record['speedup']}")


def record(device_name: str, loss_equal: bool, loss_tolerance: float, speedup: float | None, evidence: str,
           path: Path | None = None, finding: str | None = None) -> dict:
    """Write (or replace) ``device_name``'s record: whether the fast path's losses equalled the reference path's
    within ``loss_tolerance`` (relative), its speed over the reference path, the log it comes from and, where it
    is not verified, what was found (said where ``auto`` falls back to the reference path)."""
    doc = records(path)
    doc[device_name] = {"loss_equal": loss_equal, "loss_tolerance": loss_tolerance, "speedup": speedup,
                        "evidence": evidence, "date": time.strftime("%Y-%m-%d")}
    if finding:
        doc[device_name]["finding"] = finding
    (path or RECORDS).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return doc[device_name]


def main(argv: list[str] | None = None) -> None:
    """``python -m tunesmith.machine.verified --evidence LOG [--speedup X]``: record this machine's GPU as verified
    (run by ``scripts/gpu_run.sh verify`` once the loss-equality tests passed on it)."""
    import argparse

    import torch

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--evidence", required=True, help="the log of the passing tests")
    ap.add_argument("--tolerance", type=float, default=1e-5, help="the relative loss tolerance the tests held")
    ap.add_argument("--speedup", type=float, default=None, help="fast path tokens/s over the reference path's")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: nothing to record")
    name = torch.cuda.get_device_name()
    print(name, record(name, True, args.tolerance, args.speedup, args.evidence))


if __name__ == "__main__":
    main()
