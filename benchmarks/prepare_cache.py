"""`data prepare` on 100k records: a cold build (read, scrub, length filters with the SmolLM2 tokenizer,
exact and near dedup, split, write) vs the same recipe again with a warm cache, in one process.

Records: pairs of real BANKING77 messages (``../shared/data/banking77`` or ``examples/data``),
labelled with the first message's intent. Profile off, as in the issue.

    python benchmarks/prepare_cache.py --n 100000
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import tempfile
import time
from pathlib import Path

from rich.console import Console

REPO = Path(__file__).resolve().parents[1]
SOURCES = [
    REPO.parent / "shared" / "data" / "banking77" / "banking77_train.csv",
    REPO / "examples" / "data" / "banking77_10intents.csv",
]


def make_records(n: int, path: Path, seed: int = 0) -> None:
    src = next(p for p in SOURCES if p.is_file())
    with open(src, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            a, b = rng.choice(rows), rng.choice(rows)
            fh.write(json.dumps({"text": f"{a['text']}  {b['text']}", "category": a["category"]}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()

    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    import tunesmith.kinds  # noqa: F401 - registers the task kinds the schema checks
    import tunesmith.train  # noqa: F401 - registers the training methods (their shapes and trainers)
    from tunesmith.config import validate_recipe
    from tunesmith.data.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["TUNESMITH_DATA_CACHE"] = str(tmp / "cache")
        data = tmp / "records.jsonl"
        make_records(args.n, data)
        recipe = validate_recipe(
            {
                "name": "bench",
                "output_dir": str(tmp / "runs"),
                "model": {"name": args.model},
                "data": {
                    "path": str(data),
                    "input_fields": ["text"],
                    "target_field": "category",
                    "on_error": "skip",
                    "profile": {"enabled": False},
                    "split": {"train": 0.8, "val": 0.1, "test": 0.1},
                    "steps": [
                        {"step": "scrub"},
                        {"step": "char_length", "min": 10, "max": 400},
                        {"step": "token_length", "min": 4, "max": 64},
                        {"step": "exact_dedup"},
                        {"step": "near_dedup", "threshold": 0.8},
                    ],
                },
            }
        )
        console = Console(quiet=True)
        out = tmp / "runs" / "bench" / "data"
        t0 = time.perf_counter()
        cold = prepare(recipe, out, console)
        t_cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = prepare(recipe, out, console)
        t_warm = time.perf_counter() - t0
        assert warm.cached and not cold.cached
        assert [e.id for e in warm.splits["train"]] == [e.id for e in cold.splits["train"]]
        print(f"{args.n:,} records; kept {cold.summary['examples']:,}, rejected {cold.rejected:,}")
        for row in cold.steps:
            print(f"  {row.step:<16} in {row.n_in:>7,}  kept {row.kept:>7,}  dropped {row.dropped:>6,}")
        print(f"cold (no cache): {t_cold:7.2f} s  {args.n / t_cold:10,.0f} records/s")
        print(f"warm cache     : {t_warm:7.2f} s  {args.n / t_warm:10,.0f} records/s")
        print(f"speed-up (cold / warm): {t_cold / t_warm:.1f}x")


if __name__ == "__main__":
    main()
