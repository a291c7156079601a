"""Which generation engine ``auto`` picks on a device: ``engine_measured.json`` beside this module holds, per
device kind, the built-in engine's and vLLM's wall times on the same work, each written by the measurement
itself (``benchmarks/generation_engines.py --record``: the demo's evaluation, and a reinforcement job's rollouts).

``eval.engine``, ``synth.engine`` and ``train.grpo.rollouts`` set to ``auto`` read it through :func:`choose`:
vLLM where its record measured it faster and it can run here, else the built-in engine (the one always present,
and the faster one wherever this was measured so far). A device without a record keeps the built-in engine and
says how to measure it, as ``train.path: auto`` keeps the reference path on a GPU kind the check has not verified.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path

RECORDS = Path(__file__).with_name("engine_measured.json")
WRITER = "benchmarks/generation_engines.py"
WORKLOAD_OF = {"eval": "eval", "synth": "eval", "rollouts": "reinforcement"}  # what each use was measured by
WORKLOAD_WORDS = {"eval": "the demo's evaluation (greedy answers of the base model and its LoRA adapter)",
                  "reinforcement": "a reinforcement job (sampled rollouts, the policy's adapter reloaded each step)"}


@dataclass(frozen=True)
class Choice:
    """The engine a use generates on (builtin or vllm) and why, in words a log line can carry."""

    engine: str
    reason: str


def device_kind(device: str = "auto") -> str:
    """The key a record is filed under: the GPU's name as torch gives it, or ``cpu``."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def records(path: Path | None = None) -> dict[str, dict]:
    """Device kind -> workload -> its evidence; empty when there is no file."""
    try:
        return json.loads((path or RECORDS).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def verdict(evidence: dict) -> str | None:
    """Why ``evidence`` cannot decide (None: it can): written by the measurement, both wall times measured, and
    for the greedy evaluation the same scores on both engines (else they did not do the same work; a near-tie
    token may still flip between runs of either, so single predictions are counted, not required equal)."""
    if evidence.get("written_by") != WRITER:
        return f"its record was not written by the measurement ({WRITER} --record)"
    times = [evidence.get("builtin_s"), evidence.get("vllm_s")]
    if not all(isinstance(t, (int, float)) and t > 0 for t in times):
        return f"its record lacks a wall time of each engine (builtin_s {times[0]}, vllm_s {times[1]})"
    if evidence.get("workload") == "eval" and evidence.get("metrics_identical") is not True:
        return "the two engines' scores were not identical there, so their times do not compare the same work"
    return None


def choose(use: str, device: str, vllm_available: bool, path: Path | None = None) -> Choice:
    """The engine ``use`` (eval, synth or rollouts) generates on for ``auto`` on ``device`` (a kind, as
    :func:`device_kind` names it); ``vllm_available``: whether vLLM can run here for that use."""
    workload = WORKLOAD_OF[use]
    evidence = records(path).get(device, {}).get(workload)
    measure = f"python {WRITER} {workload} --record"
    if not evidence:
        return Choice("builtin", f"no measurement of vLLM beside the built-in engine on {device} ({measure})")
    finding = verdict(evidence)
    if finding is not None:
        return Choice("builtin", f"the {device} record cannot decide: {finding} ({measure})")
    ratio = evidence["vllm_s"] / evidence["builtin_s"]
    measured = (f"vLLM took {ratio:.2f}x the built-in engine's time for {WORKLOAD_WORDS[workload]} on {device} "
                f"({evidence.get('date', 'undated')}, {evidence.get('model', 'model unnamed')})")
    if ratio >= 1.0:
        return Choice("builtin", measured)
    if not vllm_available:
        return Choice("builtin", f"{measured}, but vLLM cannot run here (`make vllm`, or $TUNESMITH_VLLM_PYTHON)")
    return Choice("vllm", measured)


def write(device: str, workload: str, evidence: dict, path: Path | None = None) -> dict:
    """File the measurement's ``evidence`` for ``workload`` on ``device`` (replacing an earlier one); returns
    the record as written."""
    if workload not in WORKLOAD_WORDS:
        raise ValueError(f"workload is one of {sorted(WORKLOAD_WORDS)}, got '{workload}'")
    record = {"date": datetime.date.today().isoformat(), **evidence, "workload": workload, "written_by": WRITER}
    doc = records(path)
    doc.setdefault(device, {})[workload] = record
    (path or RECORDS).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return record
