"""``data.engine: ray`` on a two-node Ray cluster started inside the test (no network): byte for byte the files
of the local engine (examples, splits, rejects, step counts, profile) on real BANKING77 rows with planted exact
and near duplicates and a broken line, read in several shards and curated on both nodes; the same on a 5,000-row
LSH bucket and on a field first seen at row 1,501; a driver whose peak memory does not grow with the rows; and
clear errors."""

import csv
import json
import os
import random
import time
from pathlib import Path

import pytest
from rich.console import Console

from tunesmith.config import load_recipe
from tunesmith.data.engines import ray_read
from tunesmith.data.prepare import build
from tunesmith.data.read import batches
from tunesmith.errors import ConfigError, DataError

from .conftest import EXAMPLE_CSV, write_recipe
from .test_data_dedup import bucket_file
from .test_data_stream import late_field_rows, peak_kb, write_rows

ray = pytest.importorskip("ray", reason="Ray is the optional extra tunesmith[ray]")

STEPS = [
    {"step": "scrub", "fields": ["text"]},
    {"step": "token_length", "fields": ["text"], "min": 3, "max": 150},
    {"step": "exact_dedup", "fields": ["text"]},
    {"step": "near_dedup", "fields": ["text"], "threshold": 0.7},
    {"step": "sample", "fraction": 0.9, "seed": 3},  # needs every row: runs on the driver, rows go on after it
    {"step": "char_length", "fields": ["text"], "max": 60},
]
FILES = ("examples.jsonl", "train.jsonl", "val.jsonl", "test.jsonl", "rejected.jsonl", "steps.md", "examples.split")


@pytest.fixture(scope="module")
def cluster():
    """A head and one worker node, one CPU and a 100 MB object store each, shut down after the module."""
    from ray.cluster_utils import Cluster

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.shutdown()  # the engine attaches to a Ray this process already runs: none may be left from elsewhere
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 100 * 2**20,
                                                      "include_dashboard": False})
    c.add_node(num_cpus=1, object_store_memory=100 * 2**20)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


def listing_rows() -> list[str]:
    """600 BANKING77 rows as JSON lines: every 20th copied exactly later on (one of them upper-cased), every
    20th reworded by one word, one row too short for the token limit, one without a label, one broken line."""
    with open(EXAMPLE_CSV, newline="", encoding="utf-8") as fh:
        rows = [{"text": r["text"], "category": r["category"]} for r in csv.DictReader(fh)][:600]
    rng = random.Random(7)
    for k, r in enumerate(rows[:600:20]):
        copy = dict(r, text=r["text"].upper() if k % 2 else r["text"])
        rows.insert(rng.randrange(rows.index(r) + 1, len(rows) + 1), copy)
    for r in rows[5:600:20]:
        words = r["text"].split() + ["please"]
        rows.insert(rng.randrange(rows.index(r) + 1, len(rows) + 1), dict(r, text=" ".join(words)))
    rows[40] = {"text": "hi", "category": rows[40]["category"]}
    rows[41] = {"text": rows[41]["text"], "category": ""}
    lines = [json.dumps(r) for r in rows]
    lines.insert(100, '{"text": "broken line, no closing brace"')
    return lines


def prepare(tmp_path, model_dir, data, out, **section):
    doc = {"name": "ray", "output_dir": str(tmp_path / "runs"), "seed": 5, "model": {"name": str(model_dir)},
           "data": {"path": str(data), "input_fields": ["text"], "target_field": "category", "on_error": "skip",
                    "batch_rows": 100, "profile": {"enabled": False}, "cache": False, **section}}
    doc["data"] = {k: v for k, v in doc["data"].items() if v is not None}
    recipe = load_recipe(write_recipe(tmp_path / f"{out}.yaml", doc))
    return build(recipe, tmp_path / out, Console(file=open(os.devnull, "w")))  # noqa: SIM115


def same_files(tmp_path, *names):
    for name in names:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name


def test_ray_engine_writes_the_local_engines_files(cluster, tmp_path, tiny_model_dir, home, monkeypatch):
    monkeypatch.setattr(batches, "FIRST_BATCH", 50)  # 8 batches: the dedup decisions span batches and nodes
    monkeypatch.setattr(ray_read, "SHARD_BYTES", 8_000)  # and shards: the file is read in byte ranges
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(listing_rows()) + "\n", encoding="utf-8")
    assert len(ray_read.plan(load_recipe(write_recipe(tmp_path / "p.yaml", {
        "name": "p", "model": {"name": str(tiny_model_dir)}, "data": {
            "path": str(data), "input_fields": ["text"], "target_field": "category", "batch_rows": 100}})).data)) > 3
    profile = {"profile": {"enabled": True}}
    local = prepare(tmp_path, tiny_model_dir, data, "local", steps=STEPS, **profile)
    t0 = time.time()
    on_ray = prepare(tmp_path, tiny_model_dir, data, "ray", steps=STEPS, engine="ray", ray_address=cluster.address,
                     **profile)
    print(f"ray engine: {time.time() - t0:.1f} s")
    same_files(tmp_path, *FILES, "profile/report.md")
    nodes = on_ray.summary.pop("Ray nodes that curated")
    assert on_ray.summary == local.summary
    assert nodes == 2, "every batch ran on one node"
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "ray" / "rejected.jsonl").open()]
    for kind in ("exact duplicate of", "near duplicate of", "tokens < min", "not in the sample", "is missing"):
        assert any(kind in r for r in reasons), kind
    assert any("Expecting" in r or "JSON" in r for r in reasons), reasons[:5]
    assert not ray.is_initialized(), "the engine disconnects from the cluster it attached to"


def test_a_5000_row_bucket_keeps_the_local_engines_rows(cluster, tmp_path, tiny_model_dir, home, monkeypatch):
    monkeypatch.setattr(ray_read, "SHARD_BYTES", 200_000)  # 5 shards, the bucket's rows in all of them
    data = bucket_file(tmp_path / "bucket.jsonl")
    section = {"steps": [{"step": "near_dedup", "threshold": 0.8}], "batch_rows": 2_000}
    prepare(tmp_path, tiny_model_dir, data, "local", **section)
    prepare(tmp_path, tiny_model_dir, data, "ray", engine="ray", ray_address=cluster.address, **section)
    same_files(tmp_path, *FILES)
    assert (tmp_path / "ray" / "rejected.jsonl").read_text().count("near duplicate of") > 5_000


def test_a_field_first_seen_at_row_1501_prepares_on_ray(cluster, tmp_path, tiny_model_dir, home, monkeypatch):
    monkeypatch.setattr(ray_read, "SHARD_BYTES", 20_000)
    data = write_rows(tmp_path / "late.jsonl", late_field_rows())
    section = {"target_field": "label", "steps": [{"step": "scrub", "fields": ["text", "note"]}],
               "batch_rows": 500, "derive": {"both": "{text} {note}"}}
    prepare(tmp_path, tiny_model_dir, data, "local", **section)
    prepare(tmp_path, tiny_model_dir, data, "ray", engine="ray", ray_address=cluster.address, **section)
    same_files(tmp_path, *FILES)
    section["steps"] = [{"step": "scrub", "fields": ["text", "nope"]}]
    with pytest.raises(DataError, match=r"no record has the field 'nope'; fields present: \['both', 'label', 'note'"):
        prepare(tmp_path, tiny_model_dir, data, "ray", engine="ray", ray_address=cluster.address, **section)


def driver_peak_mb(tmp_path: Path, model_dir, cluster, n: int, both_nodes: bool) -> float:
    """Peak resident memory of ``tunesmith data prepare`` (the driver) on ``n`` listing rows on the cluster;
    ``both_nodes``: that both nodes curated is checked too (with 20 parts; 2 parts may both run on the head when the
    first ends before the second is scheduled, as seen once on a busy machine)."""
    kb, printed = peak_kb(tmp_path, model_dir, n, batch_rows=1_000, engine="ray", ray_address=cluster.address,
                          cache=False, profile={"enabled": False})
    if both_nodes:
        assert "Ray nodes that curated: 2" in " ".join(printed.split())  # both nodes did work
    return kb / 1024


def test_the_drivers_peak_does_not_grow_with_the_rows(cluster, tmp_path, tiny_model_dir, home):
    """10x the rows (2,000 → 20,000: 1 → 3 shards, 2 → 20 parts) through the five steps: the driver's peak stays
    within 20% (the 1M-row figure is in docs/benchmarks.md)."""
    small = driver_peak_mb(tmp_path, tiny_model_dir, cluster, 2_000, both_nodes=False)
    large = driver_peak_mb(tmp_path, tiny_model_dir, cluster, 20_000, both_nodes=True)
    print(f"driver peak: {small:.0f} MB at 2,000 rows, {large:.0f} MB at 20,000")
    assert large <= small * 1.2, (small, large)


def test_a_steps_own_error_comes_back_as_itself(cluster, tmp_path, tiny_model_dir, home):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": t, "category": "a"}) + "\n" for t in ("one", "two", "three")))
    with pytest.raises(DataError, match=r"rows.jsonl:1: text: 'one' is not a number"):
        prepare(tmp_path, tiny_model_dir, data, "ray", on_error="fail", engine="ray", ray_address=cluster.address,
                steps=[{"step": "numeric_range", "fields": ["text"], "min": 0}])


def test_an_unreachable_address_fails_at_once(tmp_path, tiny_model_dir, home):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"text": "hello there", "category": "a"}) + "\n")
    ray.shutdown()
    t0 = time.time()
    with pytest.raises(ConfigError, match="data.ray_address: no Ray cluster answers at 127.0.0.1:9"):
        prepare(tmp_path, tiny_model_dir, data, "ray", engine="ray", ray_address="127.0.0.1:9")
    assert time.time() - t0 < 10
