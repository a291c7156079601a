"""One near dedup for every engine: the same kept rows and reasons in memory and streamed at any batch size, for
buckets of any size (a 5,000-row LSH bucket of near copies of real BANKING77 text); the sketch bound that decides
which pairs are read back never below the exact Jaccard; and the sorted runs of the streaming index merged by size
tiers."""

import csv
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from tunesmith.config import load_recipe
from tunesmith.data.dedup import index as dedup_index
from tunesmith.data.dedup import minhash
from tunesmith.data.dedup.index import SortedRuns
from tunesmith.data.dedup.jaccard import jaccard_bound, sketches
from tunesmith.data.prepare import build
from tunesmith.data.read import batches
from tunesmith.data.read.sources import read_source
from tunesmith.data.steps.curation import StepContext, run_steps

from .conftest import EXAMPLE_CSV, write_recipe

NEAR = {"step": "near_dedup", "threshold": 0.8}


def banking_texts() -> list[str]:
    with open(EXAMPLE_CSV, newline="", encoding="utf-8") as fh:
        return [r["text"] for r in csv.DictReader(fh)]


def bucket_file(path: Path, copies: int = 6_000, reworked: int = 1_500, others: int = 1_500, seed: int = 0) -> Path:
    """Near copies of one 100-word text made of real BANKING77 messages: ``copies`` with one of its last five words
    replaced (so one LSH bucket holds over 5,000 of them) and ``reworked`` with 2 to 15 words replaced anywhere,
    shuffled among ``others`` rows of two real messages each."""
    rng = random.Random(seed)
    texts = banking_texts()
    vocab = sorted({w for t in texts for w in t.split()})
    words: list[str] = []
    while len(words) < 100:
        words += rng.choice(texts).split()
    rows = []
    for k in range(copies + reworked):
        w = list(words[:100])
        for _ in range(1 if k < copies else rng.randint(2, 15)):
            w[rng.randrange(95, 100) if k < copies else rng.randrange(100)] = rng.choice(vocab)
        rows.append(" ".join(w))
    rows += [f"{rng.choice(texts)} {rng.choice(texts)}" for _ in range(others)]
    rng.shuffle(rows)
    path.write_text("".join(json.dumps({"text": t, "category": "ab"[i % 2]}) + "\n" for i, t in enumerate(rows)))
    return path


def variants_file(path: Path, seed: int = 0) -> Path:
    """3,000 rows, 1,500 of them one-word variants of one real message (the case that once kept 1,647 rows at
    20,000-row batches and 1,646 at 100)."""
    rng = random.Random(seed)
    texts = banking_texts()
    vocab = sorted({w for t in texts for w in t.split()})
    base = max(texts, key=lambda t: len(t.split())).split()[:14]
    rows = []
    for _ in range(1_500):
        w = list(base)
        w[rng.randrange(len(w))] = rng.choice(vocab)
        rows.append(" ".join(w))
    rows += [f"{rng.choice(texts)} {rng.choice(texts)}" for _ in range(1_500)]
    rng.shuffle(rows)
    path.write_text("".join(json.dumps({"text": t, "category": "ab"[i % 2]}) + "\n" for i, t in enumerate(rows)))
    return path


def recipe(tmp_path: Path, model_dir, data: Path, batch_rows: int, name: str):
    doc = {"name": name, "output_dir": str(tmp_path / "runs"), "seed": 3, "model": {"name": str(model_dir)},
           "data": {"path": str(data), "input_fields": ["text"], "target_field": "category", "cache": False,
                    "batch_rows": batch_rows, "profile": {"enabled": False}, "steps": [NEAR]}}
    return load_recipe(write_recipe(tmp_path / f"{name}.yaml", doc))


def in_memory(cfg) -> list[tuple[str, str]]:
    records, _ = read_source(cfg)
    _, dropped, _ = run_steps(records, cfg.steps, StepContext())
    return [(r.source, r.reason) for r in dropped]


def streamed(tmp_path: Path, model_dir, data: Path, batch_rows: int) -> list[tuple[str, str]]:
    out = tmp_path / f"out{batch_rows}"
    build(recipe(tmp_path, model_dir, data, batch_rows, f"b{batch_rows}"), out, Console(file=open(os.devnull, "w")))  # noqa: SIM115
    return [(r["source"], r["reason"]) for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())]


def largest_bucket(texts: list[str]) -> int:
    sh = minhash.shingle(texts)
    keys = minhash.band_keys(minhash.signatures(sh), *minhash.lsh_params(NEAR["threshold"], 128))
    return int(minhash.lsh_groups(*minhash.keyed_rows(keys, np.arange(len(texts)))).sizes.max())


def test_a_5000_row_bucket_keeps_the_same_rows_in_memory_and_at_any_batch_size(tmp_path, tiny_model_dir, home,
                                                                                  monkeypatch):
    monkeypatch.setattr(batches, "FIRST_BATCH", 100)
    data = bucket_file(tmp_path / "bucket.jsonl")
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    assert largest_bucket(texts) >= 5_000
    want = in_memory(recipe(tmp_path, tiny_model_dir, data, 20_000, "mem").data)
    kept = len(texts) - len(want)
    assert 1_600 < kept < 4_000, kept  # reworked copies both dropped and kept: every decision counts
    assert streamed(tmp_path, tiny_model_dir, data, 500) == want  # 19 batches: the bucket spans them all
    assert streamed(tmp_path, tiny_model_dir, data, 20_000) == want


def test_one_word_variants_keep_the_same_rows_at_any_batch_size(tmp_path, tiny_model_dir, home, monkeypatch):
    monkeypatch.setattr(batches, "FIRST_BATCH", 100)
    data = variants_file(tmp_path / "variants.jsonl")
    want = in_memory(recipe(tmp_path, tiny_model_dir, data, 20_000, "mem").data)
    assert streamed(tmp_path, tiny_model_dir, data, 100) == want
    assert streamed(tmp_path, tiny_model_dir, data, 20_000) == want


def test_large_groups_are_checked_pair_for_pair_as_small_ones(monkeypatch):
    """A group above ``SMALL_GROUP`` is checked by a matrix product: the same matches as pair by pair."""
    rng = random.Random(1)
    base = " ".join(banking_texts()[:8]).split()[:40]
    rows = []
    for _ in range(400):
        w = list(base)
        for _ in range(rng.randint(1, 8)):
            w[rng.randrange(40)] = rng.choice(base)
        rows.append(" ".join(w))
    pairs_small = minhash.near_matches(rows, 0.8)
    monkeypatch.setattr(minhash, "SMALL_GROUP", 3)
    pairs_large = minhash.near_matches(rows, 0.8)
    assert all(np.array_equal(a, b) for a, b in zip(pairs_small, pairs_large, strict=True))
    assert len(pairs_small[0]) > 100


@pytest.mark.parametrize("largest", [1 << 22, 300])
@pytest.mark.parametrize("spill", [False, True])
def test_sorted_runs_merge_by_size_tiers_and_find_every_key(largest, spill, monkeypatch, tmp_path):
    """With ``spill`` the large runs' values live in files: the same answers, less memory, no file left."""
    monkeypatch.setattr(SortedRuns, "LARGEST", largest)
    monkeypatch.setattr(SortedRuns, "SPILL", 100)
    rng = np.random.default_rng(0)
    runs, every = SortedRuns(np.uint64, np.uint32, spill=tmp_path / "v" if spill else None), []
    for b in range(200):
        keys = rng.integers(0, 5_000, size=50).astype(np.uint64)
        runs.add(keys, np.arange(b * 50, (b + 1) * 50))
        every.append(keys)
        assert len(runs.runs) <= int(np.log2(b + 1)) + 1 + 100 * (b + 1) // largest  # a binary counter of runs
        assert max(len(k) for k, _ in runs.runs) <= max(largest, 50)
    every = np.concatenate(every)
    first = {}
    for p, k in enumerate(every.tolist()):
        first.setdefault(k, p)
    probe = np.arange(5_100, dtype=np.uint64)
    assert runs.first(probe).tolist() == [first.get(k, -1) for k in probe.tolist()]
    q, found = runs.every(np.array([7, 5_050, 11], np.uint64))
    assert sorted(found[q == 0].tolist()) == np.flatnonzero(every == 7).tolist()
    assert sorted(found[q == 2].tolist()) == np.flatnonzero(every == 11).tolist() and not (q == 1).any()
    files = list((tmp_path / "v").glob("*.bin")) if spill else []
    assert len(files) == sum(len(k) >= 100 for k, _ in runs.runs) * spill  # merged-away runs' files are removed
    assert runs.nbytes == 8 * len(every) + 4 * sum(len(k) for k, _ in runs.runs if len(k) < 100 or not spill)
    runs.close()
    assert not runs.runs and not any(f.exists() for f in files)


@pytest.mark.parametrize("threshold", [0.5, 0.9])
def test_matches_equal_a_brute_force_over_every_candidate_pair(threshold):
    rng = random.Random(threshold)
    texts = banking_texts()[:300]
    texts += [" ".join(rng.sample(t.split(), len(t.split()))) for t in texts[:100]] + ["", ""]
    sh = minhash.shingle(texts)
    keys = minhash.band_keys(minhash.signatures(sh), *minhash.lsh_params(threshold, 128))
    cand = np.array([(i, j) for j in range(len(texts)) for i in range(j)
                     if len(sh.of(i)) and len(sh.of(j)) and (keys[i] == keys[j]).any()])
    sim = minhash.exact_jaccard(sh, cand)
    sets = [set(sh.of(k).tolist()) for k in range(len(texts))]
    assert all(abs(len(sets[a] & sets[b]) / len(sets[a] | sets[b]) - s) < 1e-12 for (a, b), s in zip(cand, sim, strict=True))
    hit = sim >= threshold
    want = minhash.best_earlier(cand[hit, 0], cand[hit, 1], sim[hit])
    got = minhash.near_matches(texts, threshold)
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def test_the_jaccard_bound_is_never_below_the_exact_jaccard_and_rejects_same_template_rows():
    """The sketch's bound decides which pairs are checked, so it must never undercut: random sets of every size
    (repeats, overlaps, empty), then rows that share a template as listings of one product do (Jaccard ~0.6),
    of which the bound must set most aside."""
    rng = np.random.default_rng(3)
    sets = []
    for _ in range(200):
        n = int(rng.integers(0, 60))
        sets.append(rng.integers(0, 150 if rng.random() < 0.5 else 10**12, size=n).astype(np.uint64))
    for _ in range(200):  # variants: a few members changed, so many pairs lie near any threshold
        s = sets[int(rng.integers(0, 200))].copy()
        s[rng.integers(0, max(1, len(s)), size=int(rng.integers(0, 4)) if len(s) else 0)] = rng.integers(0, 10**12)
        sets.append(s)
    offsets = np.concatenate(([0], np.cumsum([len(s) for s in sets]))).astype(np.int64)
    sh = minhash.Shingles(np.concatenate(sets), offsets)
    sk = sketches(sh)
    pairs = np.array([(i, j) for i in range(len(sets)) for j in range(i + 1, len(sets))])
    exact = minhash.exact_jaccard(sh, pairs)
    bound = jaccard_bound(sk, pairs[:, 0], pairs[:, 1])
    assert (bound >= exact).all()
    assert ((exact > 0.6) & (exact < 1)).sum() > 100
    template = rng.integers(0, 10**12, size=25).astype(np.uint64)
    rows = [np.concatenate([template, rng.integers(0, 10**12, size=15).astype(np.uint64)]) for _ in range(200)]
    sh = minhash.Shingles(np.concatenate(rows), np.arange(0, 40 * 201, 40, dtype=np.int64))
    pairs = np.array([(i, j) for i in range(200) for j in range(i + 1, 200)])
    assert minhash.exact_jaccard(sh, pairs).max() < 0.5
    assert (jaccard_bound(sketches(sh), pairs[:, 0], pairs[:, 1]) >= 0.8).mean() < 0.2


def test_the_stream_reads_back_only_rows_that_could_match(tmp_path, tiny_model_dir, home, monkeypatch):
    """Rows that share a long template land in large LSH buckets; with the bound only rows in a pair that could
    reach the threshold have their shingle sets read back from disk (without it, every candidate's), and the kept
    rows are the same and the in-memory step's."""
    monkeypatch.setattr(batches, "FIRST_BATCH", 100)
    rng = random.Random(5)
    texts = banking_texts()
    template = " ".join(texts[0].split() + texts[1].split() + texts[2].split())
    rows = [f"{template} {t} {rng.choice(texts)}" for t in rng.sample(texts, 1_000)]
    rows += [" ".join(r.split()[:-1] + ["changed"]) for r in rng.sample(rows, 150)]  # near copies
    data = tmp_path / "template.jsonl"
    data.write_text("".join(json.dumps({"text": t, "category": "ab"[i % 2]}) + "\n" for i, t in enumerate(rows)))
    reads = []
    real_read = dedup_index.NearIndex._read
    monkeypatch.setattr(dedup_index.NearIndex, "_read", lambda self, p: reads.append(p) or real_read(self, p))
    want = in_memory(recipe(tmp_path, tiny_model_dir, data, 20_000, "mem").data)
    assert streamed(tmp_path, tiny_model_dir, data, 200) == want
    bounded = len(reads)
    reads.clear()
    monkeypatch.setattr(minhash, "jaccard_bound", lambda sk, a, b: np.ones(np.broadcast_shapes(a.shape, b.shape)))
    (tmp_path / "unbounded").mkdir()
    assert streamed(tmp_path / "unbounded", tiny_model_dir, data, 200) == want
    assert len(want) >= 150
    assert bounded * 3 < len(reads), (bounded, len(reads))


def test_closing_the_stream_lets_go_of_the_near_index(tmp_path):
    """The split runs after the stream in the same process: the index must not hold its memory through it."""
    from tunesmith.config.data import NearDedupStep
    from tunesmith.records import Record

    spec = NearDedupStep(step="near_dedup", fields=["text"])
    near = dedup_index.NearIndex(spec, tmp_path)
    rows = [Record({"text": t}, f"f:{k}") for k, t in enumerate(banking_texts()[:500])]
    near(rows, spec, None)
    assert near.sketches.nbytes > 0 and sum(r.nbytes for r in near.index) >= 8 * 500
    near.close()
    assert near.sketches.nbytes == 0 and sum(r.nbytes for r in near.index) == 0
