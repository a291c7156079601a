"""Which GPU kinds tunesmith's fast training path has been verified on: ``gpu_verified.json`` beside this module,
each record written by the check itself (:mod:`tunesmith.train.verify`, run by ``scripts/gpu_run.sh verify``)
with what it measured there, and read by :func:`tunesmith.machine.device.probe`. A record counts only with that
evidence (:func:`verdict`, the rule the check applies too); until a GPU kind has one,
``train.path: auto`` trains on the reference path (plain TRL) there and says why.
"""

from __future__ import annotations

import json
from pathlib import Path

RECORDS = Path(__file__).with_name("gpu_verified.json")
WRITER = "tunesmith.train.verify"


def records(path: Path | None = None) -> dict[str, dict]:
    """GPU name (as torch names it) -> its record; empty when there is no file."""
    try:
        return json.loads((path or RECORDS).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def verification(device_name: str, path: Path | None = None) -> tuple[bool, str | None]:
    """``(verified, finding)`` for a GPU kind: verified when its record holds the check's evidence that the fast
    path's packed rows equal one example at a time there and that it was faster than the check's baseline; else
    what its record found (None without a record)."""
    record = records(path).get(device_name)
    if not record:
        return False, None
    finding = verdict(record)
    if finding is None:
        return True, None
    return False, f"{record.get('date', 'undated')}: {record.get('finding') or finding}"


def verdict(evidence: dict) -> str | None:
    """Why ``evidence`` does not verify the fast path (None: it does): the kernel named ran, packed rows equalled
    one at a time within the tolerances, the control showed a leak, the fast path beat the named baseline, no GPU
    test failed."""
    tol, eq, sp = evidence.get("tolerance") or {}, evidence.get("equality") or {}, evidence.get("speed") or {}
    kernel = evidence.get("kernel")
    if evidence.get("written_by") != WRITER:
        return "its record was not written by the check (scripts/gpu_run.sh verify)"
    if not eq.get("kernel_calls", {}).get(kernel):
        return f"the {kernel} kernel did not run (ran: {eq.get('kernel_calls')})"
    for name, key in (("logprob", "logprob_mean_abs_diff"), ("loss", "loss_rel_diff"), ("grad", "grad_rel_diff")):
        if eq.get(key) is None or eq[key] > tol.get(name, 0.0):
            return f"packed rows differ from one at a time: {key} {eq.get(key)} over the tolerance {tol.get(name)}"
    leak = eq.get("leak_logprob_mean_abs_diff")
    if leak is None or leak <= 2 * tol.get("logprob", 0.0):
        return f"the control did not show a leak above twice the tolerance ({leak}): the check could not fail"
    if not sp.get("baseline") or (sp.get("fast_tokens_s") or 0.0) < (sp.get("baseline_tokens_s") or float("inf")):
        return f"the fast path was not faster than {sp.get('baseline')} ({sp.get('fast_tokens_s')} vs " \
               f"{sp.get('baseline_tokens_s')} tokens/s)"
    tests = evidence.get("tests")
    if tests is not None and tests.get("failed"):
        return f"{tests['failed']} GPU tests failed ({tests.get('log')})"
    return None


def write(device_name: str, evidence: dict, path: Path | None = None) -> None:
    """Write (or replace) ``device_name``'s record: the evidence :mod:`tunesmith.train.verify` measured."""
    doc = records(path)
    doc[device_name] = evidence
    (path or RECORDS).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
