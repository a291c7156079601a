"""The data stage at scale: tunesmith's streaming steps vs datatrove's readers and dedup blocks, same rows.

Rows: product listings built from the repository's price data (``../shared/data/products_amazon_in``):
a product's name and category with spans of two other products' real "about" texts, its price, and copies as real listings
have them: one in ten an exact copy of an earlier listing (case and spaces changed), one in ten a near copy
(one word changed), one in twenty a reworded copy (its words shuffled within the span).

Steps, both sides: scrub (bracket noise, product codes, whitespace), token_length (1..256 tokens of the
SmolLM2 tokenizer), numeric_range on the price (10..200,000), exact dedup of the normalised text, near dedup
on word bigrams with 128 permutations in 14 bands of 9 (threshold 0.8). tunesmith: ``tunesmith data prepare``
(profile off). datatrove: JsonlReader → the same scrub/length/price functions as pipeline steps →
ExactDedupSignature / ExactFindDedups / ExactDedupFilter → MinhashDedupSignature / Buckets / Cluster / Filter
(its LSH collisions decide; it has no exact Jaccard check; its words split by a regex, as ours, because its
English word splitter needs spaCy) → JsonlWriter, on a LocalPipelineExecutor with 2
tasks where a stage allows it. Each side runs in its own process; wall time and peak resident memory
(ru_maxrss of that process and its children) are measured from outside.

    python benchmarks/data_scale.py --rows 100000 1000000 10000000 --peers tunesmith
    python benchmarks/data_scale.py --rows 1000000 --peers tunesmith-ray    # the Ray engine on two nodes
    python benchmarks/data_scale.py --rows 10000000 --peers tunesmith --without near_dedup   # the rest of the stage

``tunesmith-ray`` runs the same recipe with ``data.engine: ray`` on a two-node ``ray.cluster_utils.Cluster``
that the benchmark starts on this machine (a head and a worker node, half the cores each, each its own raylet,
object store and workers): its row has the driver's peak (the ``tunesmith data prepare`` process) and each
node's peak (the proportional set size of its processes, summed, sampled every half second).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRICES = REPO.parent / "shared" / "data" / "products_amazon_in" / "amazon_in_products_shared.csv"
THRESHOLD, BANDS, ROWS_PER_BAND = 0.8, 14, 9
STEPS = [
    {"step": "scrub", "fields": ["text"]},
    {"step": "token_length", "fields": ["text"], "min": 1, "max": 256},
    {"step": "numeric_range", "fields": ["price"], "min": 10, "max": 200000},
    {"step": "exact_dedup", "fields": ["text"]},
    {"step": "near_dedup", "fields": ["text"], "threshold": THRESHOLD, "num_perm": BANDS * ROWS_PER_BAND},
]


def products() -> list[dict]:
    with open(PRICES, newline="", encoding="utf-8") as fh:
        return [{"name": r["product_name"], "category": r["category"].replace("|", " > "),
                 "about": r["about_product"].split(), "price": r["discounted_price"]} for r in csv.DictReader(fh)]


def listings(n: int, seed: int = 0):
    """``n`` listing rows (dicts with text and price), made as the module docstring says."""
    rng, base, made = random.Random(seed), products(), []
    for i in range(n):
        kind = i % 20
        if made and kind in (1, 11):  # exact copy, case and spacing changed
            text, price = rng.choice(made)
            text = "  ".join(text.upper().split()) if kind == 1 else text
        elif made and kind in (2, 12):  # near copy: one word changed
            text, price = rng.choice(made)
            words = text.split()
            words[rng.randrange(len(words))] = rng.choice(("new", "best", "original", "2024"))
            text = " ".join(words)
        elif made and kind == 3:  # reworded: the span's words shuffled
            text, price = rng.choice(made)
            head, _, span = text.rpartition(" | ")
            words = span.split()
            rng.shuffle(words)
            text = f"{head} | {' '.join(words)}"
        else:  # a product's name and category with spans of two other products' descriptions
            p, a, b = rng.choice(base), rng.choice(base), rng.choice(base)
            text = f"{p['name']} | {p['category']} | {_span(a['about'], rng)} {_span(b['about'], rng)}"
            price = p["price"]
        if len(made) < 20_000:
            made.append((text, price))
        else:
            made[rng.randrange(len(made))] = (text, price)
        yield {"id": str(i), "text": text, "price": price}


def _span(words: list[str], rng: random.Random, n: int = 8) -> str:
    lo = rng.randrange(max(1, len(words) - n))
    return " ".join(words[lo : lo + n])


def write_rows(folder: Path, n: int, shards: int) -> list[Path]:
    paths = [folder / f"rows-{k}.jsonl" for k in range(shards)]
    files = [open(p, "w", encoding="utf-8") for p in paths]  # noqa: SIM115
    for i, row in enumerate(listings(n)):
        files[i * shards // n].write(json.dumps(row, ensure_ascii=False) + "\n")
    for f in files:
        f.close()
    return paths


def measured(cmd: list[str], env: dict | None = None) -> tuple[float, float, float, str]:
    """Wall seconds, peak resident MB of the largest single process (Linux's wait4 over the process and its
    reaped children; Linux starts a child's peak at its parent's peak when it forks, so this process keeps
    its own small: at 10M rows, reading the input shards whole made it 1.8 GB, and every run reported that), peak
    MB of all its processes together (their proportional set sizes summed, sampled every
    half second) and the output of ``cmd``."""
    import threading

    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        peak, stop = [0], threading.Event()

        def sample() -> None:
            while not stop.wait(0.5):
                peak[0] = max(peak[0], tree_pss([proc.pid]))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        stop.set()
        sampler.join()
        log.seek(0)
        out = log.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[:4]} failed:\n{out[-3000:]}")
    return seconds, usage.ru_maxrss / 1024, peak[0] / 2**20, out


# --- tunesmith ----------------------------------------------------------------------------------


def run_tunesmith(data: Path, work: Path, engine: str = "local", address: str | None = None,
                  steps: list[dict] = STEPS) -> dict:
    import yaml

    recipe = work / f"recipe-{engine}.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": f"scale-{engine}", "output_dir": str(work / "runs"), "seed": 0,
        "model": {"name": "smollm2-135m-instruct"},
        "data": {"path": str(data), "task": "regression", "input_fields": ["text"], "target_field": "price",
                 "cache": False, "profile": {"enabled": False}, "steps": steps, "engine": engine,
                 "ray_address": address, "split": {"train": 0.8, "val": 0.1, "test": 0.1}},
    }))
    seconds, peak, total, out = measured(
        [sys.executable, "-m", "tunesmith", "data", "prepare", str(recipe), "--no-cache"], {"PYTHONPATH": str(REPO / "src")})
    with open(work / "runs" / f"scale-{engine}" / "data" / "examples.jsonl", "rb") as fh:
        kept = sum(1 for _ in fh)
    return {"seconds": seconds, "peak_mb": peak, "total_mb": total, "kept": kept}


def run_two_nodes(data: Path, work: Path) -> dict:
    """The Ray engine on a two-node cluster started here, with each node's peak memory sampled meanwhile."""
    import threading

    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    half = max(1, (os.cpu_count() or 2) // 2)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": half, "object_store_memory": 2 << 30,
                                                            "include_dashboard": False})
    worker = cluster.add_node(num_cpus=half, object_store_memory=2 << 30)
    cluster.wait_for_nodes()
    nodes = {"head": cluster.head_node, "worker": worker}
    peaks, stop = dict.fromkeys(nodes, 0), threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            for name, node in nodes.items():
                peaks[name] = max(peaks[name], node_pss(node))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = run_tunesmith(data, work, "ray", cluster.address)
    finally:
        stop.set()
        sampler.join()
        cluster.shutdown()
    return {**result, "nodes_mb": {k: v / 2**20 for k, v in peaks.items()}}


def node_pss(node) -> int:
    """Bytes of a Ray node's processes and their children (their proportional set sizes summed: shared pages,
    the object store's among them, counted once across them)."""
    return tree_pss([info.process.pid for infos in node.all_processes.values() for info in infos])


def tree_pss(pids: list[int]) -> int:
    """Bytes of the processes ``pids`` and their descendants: proportional set sizes summed."""
    import psutil

    total, seen = 0, set()
    for pid in pids:
        try:
            procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            if proc.pid in seen:
                continue
            seen.add(proc.pid)
            try:
                total += proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
    return total


# --- datatrove ----------------------------------------------------------------------------------


def datatrove_main(folder: str, work: str, tasks: int) -> None:
    """The five steps as a datatrove pipeline (runs in its own process; prints the kept count)."""
    import datatrove.pipeline.dedup.minhash as dt_minhash
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, ExactFindDedups
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    from tunesmith.config import ScrubStep
    from tunesmith.data.steps.curation import number_value, scrub_text
    from tunesmith.data.tokens import token_counts
    from tunesmith.models.loading import load_tokenizer

    class Words(WordTokenizer):
        """Unicode words by one regex (as tunesmith splits them) instead of spaCy, which is not installed."""

        def word_tokenize(self, text: str) -> list[str]:
            return re.findall(r"\w+", text)

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [m.span() for m in re.finditer(r"\w+", text)]

    dt_minhash.load_word_tokenizer = lambda language: Words(language)
    w = Path(work)
    tok = load_tokenizer("smollm2-135m-instruct")
    scrub_spec = ScrubStep(step="scrub", fields=["text"])

    def curate(data, rank: int = 0, world_size: int = 1):
        """scrub → token_length → numeric_range, in blocks of 2,000 documents (tokenised in one call)."""
        block = []
        for doc in data:
            block.append(doc)
            if len(block) == 2000:
                yield from _curate_block(block)
                block = []
        yield from _curate_block(block)

    def _curate_block(block):
        for doc in block:
            doc.text = scrub_text(doc.text, scrub_spec)
        block = [d for d in block if d.text.strip()]
        counts = token_counts([d.text for d in block], tok) if block else []
        for doc, n in zip(block, counts, strict=True):
            price = number_value(doc.metadata.get("price"))
            if 1 <= n <= 256 and price is not None and 10 <= price <= 200000:
                yield doc

    def normalised(doc) -> bytes:
        return " ".join(doc.text.lower().split()).encode("utf-8")

    normalised.__annotations__["return"] = bytes  # datatrove picks its hash by the annotation's type

    exact = ExactDedupConfig(content_getter=normalised)
    minhash = MinhashConfig(n_grams=2, num_buckets=BANDS, hashes_per_bucket=ROWS_PER_BAND,
                            hash_config=HashConfig(precision=64, hash_fc="sha1"))  # its xxhash path needs bytes

    def reader():
        return JsonlReader(folder, glob_pattern="rows-*.jsonl")

    def stage(pipeline, name, n_tasks=tasks):
        LocalPipelineExecutor(pipeline=pipeline, tasks=n_tasks, workers=n_tasks, logging_dir=str(w / "logs" / name),
                              skip_completed=False).run()

    stage([reader(), curate, ExactDedupSignature(str(w / "exact_sigs"), exact, finder_workers=1)], "exact1")
    stage([ExactFindDedups(str(w / "exact_sigs"), str(w / "exact_dups"), exact)], "exact2", 1)
    stage([reader(), curate, ExactDedupFilter(str(w / "exact_dups"), exact), JsonlWriter(str(w / "curated"))],
          "exact3")
    stage([JsonlReader(str(w / "curated")), MinhashDedupSignature(str(w / "mh_sigs"), minhash)], "mh1")
    stage([MinhashDedupBuckets(str(w / "mh_sigs"), str(w / "mh_buckets"), config=minhash)], "mh2", BANDS)
    stage([MinhashDedupCluster(str(w / "mh_buckets"), str(w / "mh_ids"), config=minhash)], "mh3", 1)
    stage([JsonlReader(str(w / "curated")), MinhashDedupFilter(str(w / "mh_ids")), JsonlWriter(str(w / "out"))],
          "mh4")
    import gzip

    kept = sum(sum(1 for _ in gzip.open(p, "rt")) for p in (w / "out").glob("*.jsonl.gz"))
    print(f"KEPT {kept}")


def run_datatrove(folder: Path, work: Path, tasks: int) -> dict:
    seconds, peak, total, out = measured([sys.executable, __file__, "--datatrove", str(folder), str(work), str(tasks)],
                                         {"PYTHONPATH": str(REPO / "src")})
    return {"seconds": seconds, "peak_mb": peak, "total_mb": total, "kept": int(out.rsplit("KEPT ", 1)[1].split()[0])}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--datatrove":
        datatrove_main(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000])
    ap.add_argument("--peers", nargs="+", default=["tunesmith", "datatrove"],
                    help="tunesmith, tunesmith-ray (data.engine: ray on a two-node cluster started here), datatrove")
    ap.add_argument("--tasks", type=int, default=2, help="datatrove's tasks per stage (the cores)")
    ap.add_argument("--without", nargs="+", default=[], choices=[s["step"] for s in STEPS],
                    help="leave these steps out (tunesmith's local engine only): what the rest of the stage costs")
    args = ap.parse_args()
    steps = [s for s in STEPS if s["step"] not in args.without]
    if args.without and set(args.peers) != {"tunesmith"}:
        ap.error("--without measures tunesmith's local engine only: give --peers tunesmith")
    if args.without:
        print(f"steps: {', '.join(s['step'] for s in steps)} (without {', '.join(args.without)})")
    print(f"cores {os.cpu_count()}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| rows | peer | seconds | rows/s | peak MB (largest process) | peak MB (all its processes) | kept "
          "| per node MB |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for n in args.rows:
        with tempfile.TemporaryDirectory(prefix="data-scale-") as tmp:
            tmp = Path(tmp)
            (tmp / "in").mkdir()
            shards = write_rows(tmp / "in", n, args.tasks)
            one = tmp / "all.jsonl"
            with open(one, "wb") as out:  # the same rows in the same order, one file for tunesmith
                for p in shards:
                    with open(p, "rb") as part:  # in pieces: this process's peak is what the measured ones inherit
                        shutil.copyfileobj(part, out, 1 << 24)
            results = {}
            for peer in args.peers:
                r = results[peer] = (run_tunesmith(one, tmp, steps=steps) if peer == "tunesmith"
                                     else run_two_nodes(one, tmp) if peer == "tunesmith-ray"
                                     else run_datatrove(tmp / "in", tmp / "dt", args.tasks))
                nodes = " / ".join(f"{k} {v:,.0f}" for k, v in r.get("nodes_mb", {}).items())
                print(f"| {n:,} | {peer} | {r['seconds']:.0f} | {n / r['seconds']:,.0f} | {r['peak_mb']:,.0f} "
                      f"| {r['total_mb']:,.0f} | {r['kept']:,} | {nodes} |", flush=True)
            if {"tunesmith", "datatrove"} <= set(results):
                a, b = results["tunesmith"], results["datatrove"]
                print(f"|  | ratio (datatrove / tunesmith) | {b['seconds'] / a['seconds']:.2f}x time | | "
                      f"{b['peak_mb'] / a['peak_mb']:.2f}x | {b['total_mb'] / a['total_mb']:.2f}x | | |", flush=True)
    print(f"load average after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
