"""What a python grader costs per training step: one sandboxed process per batch (ours) against one process
per completion (the plain way to isolate each call), on the same rows and grader.

The grader is a JSON-field F1, the kind a reinforcement job on product listings uses; rows are completions
with two fields. Each way runs ``--repeats`` times; the median seconds per batch and the ratio are printed.

Then what the grader process's seccomp filter (tunesmith.graders.seccomp) costs, in ``--repeats`` fresh
processes: installing it, and a system call (``getppid``, the cheapest) without and with it in force,
which every system call of the grader pays from then on.

    PYTHONPATH=src python benchmarks/python_grader_batch.py [--rows 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

SOURCE = '''
import json

def grade(sample, item):
    try:
        got = json.loads(sample["output_text"])
    except ValueError:
        return 0.0
    gold = item["fields"]
    hit = sum(1 for k, v in gold.items() if got.get(k) == v)
    return 2 * hit / (len(got) + len(gold)) if got or gold else 1.0
'''


FILTER_COST = r"""
import importlib.util, os, sys, time

spec = importlib.util.spec_from_file_location("seccomp", sys.argv[1])
seccomp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seccomp)

def per_call(n=200_000):
    start = time.perf_counter_ns()
    for _ in range(n):
        os.getppid()
    return (time.perf_counter_ns() - start) / n

without = min(per_call() for _ in range(3))
start = time.perf_counter_ns()
seccomp.install()
installed = (time.perf_counter_ns() - start) / 1000
print(installed, without, min(per_call() for _ in range(3)))
"""


def filter_cost(repeats: int) -> None:
    """The seccomp filter's install time and its cost per system call, medians over fresh processes."""
    import subprocess
    import sys

    from tunesmith.graders import sandbox

    runs = [[float(x) for x in subprocess.run([sys.executable, "-I", "-c", FILTER_COST, str(sandbox.SECCOMP)],
                                              capture_output=True, text=True, check=True).stdout.split()]
            for _ in range(repeats)]
    install_us, without_ns, with_ns = (statistics.median(column) for column in zip(*runs, strict=True))
    print(f"seccomp filter: {install_us:.0f} µs to install (once per grader process); a system call "
          f"{without_ns:.0f} ns without it, {with_ns:.0f} ns with it ({with_ns / without_ns:.2f}x)")


def main() -> None:
    from tunesmith.graders.sandbox import isolation, run_python

    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = [({"output_text": json.dumps({"brand": "acme", "price": i})}, {"fields": {"brand": "acme", "price": i % 2}})
            for i in range(args.rows)]
    ways = {"one process per batch (ours)": lambda: run_python(SOURCE, rows),
            "one process per completion": lambda: [run_python(SOURCE, [row])[0] for row in rows]}
    medians, rewards = {}, {}
    for name, way in ways.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = way()
            times.append(time.perf_counter() - start)
        medians[name], rewards[name] = statistics.median(times), [o.reward for o in out]
        print(f"{name}: {medians[name]:.3f} s per batch of {args.rows} ({1000 * medians[name] / args.rows:.1f} ms "
              f"a completion; min {min(times):.3f} s)")
    a, b = medians.values()
    assert len(set(map(tuple, rewards.values()))) == 1, "both ways must give the same rewards"
    print(f"ratio: {b / a:.1f}x faster per batch; isolation: {isolation()}")
    filter_cost(args.repeats)


if __name__ == "__main__":
    main()
