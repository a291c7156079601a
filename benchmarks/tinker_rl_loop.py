"""The cookbook's ``rl_loop`` end to end against ``tunesmith serve``, before and after Tinker samples became rows of the
server's inference engine: wall time, each step's time, rewards and the server's peak memory, in one run.

Both sides run the same client (this tree's ``tunesmith cookbook`` launching ``tinker_cookbook.recipes.rl_loop``
unchanged, its GSM8K answered from a local file of word problems in GSM8K's format, written here from a seed) with
the same arguments and seed, against a server of the embedded model with API keys: **before**, the server's code at
``--before`` (a git worktree of that commit: by default the last one whose Tinker API sampled with its own batched
``generate`` beside the engine), and **after**, this tree's. One side at a time, nothing else running. The recipe's
default loss (``stable_reinforce``) and the docs' quick settings: 8 problems a step, 4 samples each, 48 tokens, 4
steps.

Prints the machine, the load average at the start and the end, each side's wall time (the client's process, from its
start to its exit), its steps' ``time/total`` and rewards, the server's peak memory, and the ratio; JSON with
``--out``.

    python benchmarks/tinker_rl_loop.py --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BEFORE = "4b6a63a"  # the commit before 3b4880c (a Tinker sample as rows of the server's engine)
MODEL = "smollm2-135m-instruct"
KEY = "bench"


def problems(n: int, seed: int) -> list[dict]:
    """``n`` arithmetic word problems in GSM8K's format (the question; the worked answer ending ``#### <number>``)."""
    rng = random.Random(seed)
    shapes = [
        ("{who} has {a} stickers and buys {b} more. How many stickers does {who} have now?", lambda a, b: a + b,
         "{a} + {b} = {x}"),
        ("A box holds {a} pencils. How many pencils are in {b} boxes?", lambda a, b: a * b, "{a} * {b} = {x}"),
        ("{who} had {a} apples and gave {b} of them away. How many apples are left?", lambda a, b: a - b,
         "{a} - {b} = {x}"),
        ("A bus has {a} rows of {b} seats. How many seats does it have?", lambda a, b: a * b, "{a} * {b} = {x}"),
    ]
    out = []
    for _ in range(n):
        text, solve, work = rng.choice(shapes)
        a, b = sorted((rng.randint(2, 30), rng.randint(2, 12)), reverse=True)
        x = solve(a, b)
        who = rng.choice(("Mia", "Tom", "Ana", "Raj", "Lee"))
        out.append({"question": text.format(who=who, a=a, b=b),
                    "answer": f"{work.format(a=a, b=b, x=x)}\n#### {x}"})
    return out


def client(data: Path, args: list[str]) -> None:
    """The client side (a process of its own): ``datasets.load_dataset("openai/gsm8k")`` answered from ``data``,
    then the recipe through ``tunesmith cookbook``'s launcher."""
    import datasets

    rows = json.loads(data.read_text())
    local = datasets.DatasetDict(train=datasets.Dataset.from_list(rows["train"]),
                                 test=datasets.Dataset.from_list(rows["test"]))
    real = datasets.load_dataset
    datasets.load_dataset = lambda path, *a, **k: local if path == "openai/gsm8k" else real(path, *a, **k)
    from tunesmith.clients.cookbook import run

    run("tinker_cookbook.recipes.rl_loop", args)


def side(name: str, src: Path, folder: Path, data: Path, recipe: list[str]) -> dict:
    """One side: a server of ``src``'s code, the recipe against it, timed; its steps' metrics."""
    from tinker_api import KeyedServer

    folder.mkdir()
    server = KeyedServer("builtin", MODEL, [], folder, env={"TUNESMITH_API_KEYS": KEY, "PYTHONPATH": str(src)})
    try:
        log = folder / "rl"
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--client", str(data), f"base_url={server.url[:-3]}",
                               f"model_name={MODEL}", f"log_path={log}", *recipe],
                              env={**os.environ, "TINKER_API_KEY": f"tml-{KEY}"}, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        peak = round(server.peak_rss / 1e9, 2)
    finally:
        server.proc.terminate()
        server.proc.wait(30)
    if done.returncode != 0:
        raise SystemExit(f"{name}: the recipe failed:\n{done.stderr[-3000:]}")
    steps = [json.loads(line) for line in (log / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [s for s in steps if "time/total" in s]
    return {"wall_s": round(wall, 1), "steps": len(steps),
            "step_s": [round(s["time/total"], 1) for s in steps],
            "reward": [round(s.get("reward/total", 0.0), 3) for s in steps],
            "trained": sum(1 for s in steps if s.get("grad_norm:mean")), "server_peak_rss_gb": peak}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--client":
        client(Path(sys.argv[2]), sys.argv[3:])
        return
    from timing import machine, worktree

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", default=BEFORE, help="the commit whose server is the 'before' side")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    load = os.getloadavg()
    print(f"machine: {machine()}  load average at start: {load[0]:.2f}  before: {args.before}  after: this tree")
    recipe = [f"batch_size={args.batch}", f"group_size={args.group}", f"max_steps={args.steps}",
              f"max_tokens={args.max_tokens}", "save_every=0"]
    rows = problems(args.batch * args.steps + 50, args.seed)
    result = {"machine": machine(), "load_start": round(load[0], 2), "before": args.before, "recipe": recipe}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "gsm8k.json"
        data.write_text(json.dumps({"train": rows[50:], "test": rows[:50]}))
        with worktree(args.before) as tree:
            for name, src in (("before", tree / "src"), ("after", REPO / "src")):
                result[name] = side(name, src, Path(tmp) / name, data, recipe)
                s = result[name]
                print(f"{name:7s} wall {s['wall_s']:7.1f} s  steps {s['step_s']} s  rewards {s['reward']}  "
                      f"trained {s['trained']} of {s['steps']}  server peak {s['server_peak_rss_gb']} GB")
    result["speedup"] = round(result["before"]["wall_s"] / result["after"]["wall_s"], 2)
    result["load_end"] = round(os.getloadavg()[0], 2)
    print(f"after / before: {result['speedup']}x faster end to end; load average at end: {result['load_end']}")
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
