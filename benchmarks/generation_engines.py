"""Everything that generates, on the built-in engine and on vLLM, in one run on the same data:

- ``eval``: the demo's evaluation (`tunesmith eval examples/banking77.yaml` over a run that `tunesmith run` trained:
  base, fine-tune and baselines on its test split) with ``eval.engine`` builtin, then vllm (vLLM's start included).
- ``reinforcement``: a reinforcement job (``--prompts`` of the demo's training rows as reinforcement rows with the
  intent as the grader's reference, ``--epochs``) on `tunesmith serve --engine builtin`, then `--engine vllm`
  (rollouts and validation on vLLM), timed from job creation to success.

Prints the wall time of each, the ratio, and whether the scores (and, for the evaluation, every prediction) are
identical. With ``--record`` it files what it measured as this device's record
(``src/tunesmith/machine/engine_measured.json``), which ``eval.engine``, ``synth.engine`` and
``train.grpo.rollouts`` set to ``auto`` choose from (:mod:`tunesmith.machine.engines`).

    python benchmarks/generation_engines.py eval --run runs/banking77-intents [--out result.json] [--record]
    python benchmarks/generation_engines.py reinforcement [--prompts 40] [--epochs 2] [--out result.json] [--record]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from serving_engines import Served  # noqa: E402 - the same server start-up as the serving benchmark

RECIPE = REPO / "examples" / "banking77.yaml"
DROP = ("seconds", "latency_ms")  # what differs by construction


def evaluation(run: Path, engine: str, out: Path) -> dict:
    """`tunesmith eval` of the demo recipe over a copy of ``run``'s training, on ``engine``."""
    name = run.name
    shutil.copytree(run / "train", out / name / "train")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tunesmith", "eval", str(RECIPE), "--set", f"output_dir={out}",
                    "--set", f"eval.engine={engine}"], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    folder = out / name / "eval"
    metrics = json.loads((folder / "metrics.json").read_text())
    return {"wall_s": round(wall, 1), "metrics": {m: {k: v for k, v in d.items() if k not in DROP}
                                                  for m, d in metrics.items()},
            "predictions": (folder / "predictions.jsonl").read_text()}


def compare_evaluations(args) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ("builtin", "vllm"):
            results[engine] = evaluation(args.run.resolve(), engine, Path(tmp) / engine)
            headline = {m: round(d.get("accuracy", float("nan")), 4) for m, d in results[engine]["metrics"].items()}
            print(f"eval on {engine:7}: {results[engine]['wall_s']} s, accuracy {headline}, load "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
    a, b = results["builtin"], results["vllm"]
    rows_a, rows_b = ([json.loads(line) for line in r["predictions"].splitlines()] for r in (a, b))
    differing = [{"builtin": x, "vllm": y} for x, y in zip(rows_a, rows_b, strict=False) if x != y]
    metrics_same = a["metrics"] == b["metrics"]
    print(f"vllm/builtin wall time {b['wall_s'] / a['wall_s']:.2f}x; identical metrics: {metrics_same}; "
          f"predictions differing: {len(differing)} of {len(rows_a)}", flush=True)
    for d in differing[:5]:
        print(f"  builtin {json.dumps(d['builtin'], ensure_ascii=False)[:300]}\n  vllm    "
              f"{json.dumps(d['vllm'], ensure_ascii=False)[:300]}")
    return {e: {k: v for k, v in r.items() if k != "predictions"} for e, r in results.items()} | {
        "identical": metrics_same and rows_a == rows_b, "metrics_identical": metrics_same, "predictions": len(rows_a),
        "predictions_differing": len(differing) + abs(len(rows_a) - len(rows_b)), "differing": differing[:20]}


def reinforcement_rows(n: int) -> list[dict]:
    with open(REPO / "examples" / "data" / "banking77_10intents.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[:n]
    labels = sorted({r["category"] for r in rows})
    system = "Name the intent of the customer message, one of: " + ", ".join(labels) + "."
    return [{"messages": [{"role": "developer", "content": system}, {"role": "user", "content": r["text"]}],
             "intent": r["category"]} for r in rows]


def reinforcement_job(engine: str, args) -> dict:
    rows = reinforcement_rows(args.prompts + args.valid)
    body = "".join(json.dumps(r) + "\n" for r in rows[: args.prompts]).encode()
    valid = "".join(json.dumps(r) + "\n" for r in rows[args.prompts:]).encode()
    grader = {"type": "text_similarity", "name": "intent", "input": "{{sample.output_text}}",
              "reference": "{{item.intent}}", "evaluation_metric": "fuzzy_match"}
    with tempfile.TemporaryDirectory() as tmp:
        server = Served(engine, "smollm2-135m-instruct", [], Path(tmp), ("--jobs-engine", engine))
        try:
            client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0)
            train = client.files.create(file=("train.jsonl", body), purpose="fine-tune")
            val = client.files.create(file=("valid.jsonl", valid), purpose="fine-tune")
            t0 = time.perf_counter()
            job = client.fine_tuning.jobs.create(
                model="smollm2-135m-instruct", training_file=train.id, validation_file=val.id, seed=7,
                method={"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": {
                    "n_epochs": args.epochs, "batch_size": 4, "compute_multiplier": 1}}})
            while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
                time.sleep(2)
            wall = time.perf_counter() - t0
            assert job.status == "succeeded", job.error
            events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
            rewards = [e.data.get("valid_reward_mean") for e in events
                       if e.type == "metrics" and e.data.get("valid_reward_mean") is not None]
            steps = [e.data.get("train_reward_mean") for e in events if e.type == "metrics"]
        finally:
            server.stop()
    print(f"reinforcement job on {engine:7}: {wall:.1f} s, validation reward (last) {rewards[:1]}, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    return {"wall_s": round(wall, 1), "valid_reward_mean": rewards, "train_reward_mean": steps}


def compare_reinforcement(args) -> dict:
    results = {engine: reinforcement_job(engine, args) for engine in ("builtin", "vllm")}
    a, b = results["builtin"], results["vllm"]
    print(f"vllm/builtin wall time {b['wall_s'] / a['wall_s']:.2f}x; identical rewards: "
          f"{a['valid_reward_mean'] == b['valid_reward_mean']}")
    return results


def evidence(part: str, result: dict, args) -> dict:
    """What the record keeps of a run: both wall times, what ran, and on what."""
    import torch

    from tunesmith.serve.engines.vllm.server import vllm_python

    version = subprocess.run([vllm_python(), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                             text=True).stdout.strip()

    out = {"builtin_s": result["builtin"]["wall_s"], "vllm_s": result["vllm"]["wall_s"],
           "model": "smollm2-135m-instruct", "vllm": version or "unknown", "torch": torch.__version__,
           "cpus": os.cpu_count(), "command": " ".join(["python", "benchmarks/generation_engines.py", *sys.argv[1:]])}
    if part == "eval":
        return out | {k: result[k] for k in ("identical", "metrics_identical", "predictions", "predictions_differing")
                      } | {"work": "tunesmith eval examples/banking77.yaml: base, "
                      "LoRA fine-tune and baselines on the 150 test examples, vLLM's start included"}
    return out | {"work": f"a reinforcement job on tunesmith serve: {args.prompts} prompts, {args.epochs} epochs, "
                  "batch 4, 4 samples a prompt, timed from creation to success"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=["eval", "reinforcement"])
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "banking77-intents",
                    help="eval: a run of examples/banking77.yaml with its training done")
    ap.add_argument("--prompts", type=int, default=40, help="reinforcement: training prompts")
    ap.add_argument("--valid", type=int, default=12, help="reinforcement: validation prompts")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--record", action="store_true", help="file the measurement as this device's record "
                    "(src/tunesmith/machine/engine_measured.json), which the engines' auto settings read")
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()}", flush=True)
    result = compare_evaluations(args) if args.part == "eval" else compare_reinforcement(args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    if args.record:
        from tunesmith.machine import engines

        device = engines.device_kind()  # where the local side ran: the GPU if there is one (model.device: auto)
        record = engines.write(device, args.part, evidence(args.part, result, args))
        print(f"recorded for {device}: {json.dumps(record)}")


if __name__ == "__main__":
    main()
