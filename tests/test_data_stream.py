"""The streaming data stage: the same kept rows, rejects and splits as the in-memory steps on the repository's
data (read in many small batches, so the dedup state crosses batches), memory that does not grow with the rows
beyond the dedup index, and progress lines when the output is a file."""

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console

from tunesmith.config import load_recipe
from tunesmith.data.dedup.index import SortedRuns
from tunesmith.data.engines import stream
from tunesmith.data.prepare import _split_section, build
from tunesmith.data.read import batches
from tunesmith.data.read.sources import read_source
from tunesmith.data.steps.curation import StepContext, run_steps
from tunesmith.data.steps.examples import to_examples
from tunesmith.data.steps.split import split_examples
from tunesmith.errors import DataError

from .conftest import EXAMPLE_CSV, write_recipe

REPO = Path(__file__).resolve().parents[1]
PRICES = Path(__file__).resolve().parents[2] / "shared" / "data" / "products_amazon_in" / "amazon_in_products_shared.csv"
FIVE_STEPS = [
    {"step": "scrub", "fields": ["text"]},
    {"step": "token_length", "fields": ["text"], "min": 2, "max": 150},
    {"step": "numeric_range", "fields": ["price"], "min": 50, "max": 100000},
    {"step": "exact_dedup", "fields": ["text"]},
    {"step": "near_dedup", "fields": ["text"], "threshold": 0.7},
]


def price_rows() -> list[dict]:
    """The price data as listings: name + category as text, the price, and a near and a reworded copy of every
    fifth product (the duplicates real listings have)."""
    import csv

    with open(PRICES, newline="", encoding="utf-8") as fh:
        rows = [{"text": f"{r['product_name']} | {r['category']}", "price": r["discounted_price"]}
                for r in csv.DictReader(fh)]
    rng = random.Random(0)
    for r in rows[::5]:
        words = r["text"].split()
        rows.insert(rng.randrange(len(rows)), {"text": " ".join(words[:-1]), "price": r["price"]})
        rows.insert(rng.randrange(len(rows)), {"text": r["text"].upper(), "price": r["price"]})
    return rows


def recipe_for(tmp_path, model_dir, data, **data_section):
    doc = {"name": "stream", "output_dir": str(tmp_path / "runs"), "seed": 5, "model": {"name": str(model_dir)},
           "data": {"path": str(data), "profile": {"enabled": False}, "cache": False, **data_section}}
    return load_recipe(write_recipe(tmp_path / "r.yaml", doc))


def in_memory(recipe):
    """The reference: every row in memory through ``run_steps``, ``to_examples`` and the split."""
    cfg = recipe.data
    ctx = StepContext(tokenizer=lambda: __import__("tunesmith.models.loading", fromlist=["x"]).load_tokenizer(
        recipe.model.name), on_error=cfg.on_error)
    records, rejected = read_source(cfg, ctx.tok)
    kept, dropped, rows = run_steps(records, cfg.steps, ctx)
    examples, unmapped = to_examples(kept, cfg)
    splits = split_examples(examples, _split_section(cfg), recipe.seed)
    return splits, rejected + dropped + unmapped, rows


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


CASES = {
    "banking77": lambda tmp: (EXAMPLE_CSV, {"input_fields": ["text"], "target_field": "category",
                                            "steps": [FIVE_STEPS[0], FIVE_STEPS[1], FIVE_STEPS[3], FIVE_STEPS[4]]}),
    "prices": lambda tmp: (_write_prices(tmp), {"task": "regression", "input_fields": ["text"],
                                                "target_field": "price", "steps": FIVE_STEPS,
                                                "split": {"train": 0.7, "val": 0.1, "test": 0.2}}),
    # two dedup steps of each kind: each keeps its own index and files
    "two_of_a_kind": lambda tmp: (EXAMPLE_CSV, {"input_fields": ["text"], "target_field": "category", "steps": [
        FIVE_STEPS[3], {"step": "near_dedup", "threshold": 0.9}, FIVE_STEPS[4],
        {"step": "exact_dedup", "fields": ["category"]}]}),
}


def _write_prices(tmp: Path) -> Path:
    if not PRICES.is_file():
        pytest.skip("../shared/data/products_amazon_in absent")
    path = tmp / "listings.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in price_rows()), encoding="utf-8")
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_streaming_keeps_rejects_and_splits_as_in_memory(case, tmp_path, tiny_model_dir, home, monkeypatch):
    monkeypatch.setattr(batches, "FIRST_BATCH", 7)
    monkeypatch.setattr(SortedRuns, "SPILL", 300)  # the larger runs' positions read back from files
    if case == "prices":  # the leading row-wise steps in the second process, as on large inputs
        monkeypatch.setattr(stream, "HELPER_BYTES", 0)
    data, section = CASES[case](tmp_path)  # many batches: the dedup state must carry across them
    recipe = recipe_for(tmp_path, tiny_model_dir, data, batch_rows=113, **section)
    splits, rejected, rows = in_memory(recipe)
    out = tmp_path / "out"
    got = build(recipe, out, Console(file=open(os.devnull, "w")))  # noqa: SIM115
    for name in ("train", "val", "test"):
        assert [r["id"] for r in read_jsonl(out / f"{name}.jsonl")] == [e.id for e in splits[name]], name
        assert [e.target for e in got.splits[name]] == [e.target for e in splits[name]], name
    want = Counter((r.source, r.stage, r.reason) for r in rejected)
    assert Counter((r["source"], r["stage"], r["reason"]) for r in read_jsonl(out / "rejected.jsonl")) == want
    assert [(r.step, r.n_in, r.kept, r.dropped, r.changed) for r in got.steps] == [
        (r.step, r.n_in, r.kept, r.dropped, r.changed) for r in rows]
    dropped_by = {r.stage.split(":")[-1] for r in rejected}
    assert {"exact_dedup", "near_dedup"} <= dropped_by, dropped_by


def test_a_near_duplicate_is_named_by_its_most_similar_earlier_row(tmp_path, tiny_model_dir, home, monkeypatch):
    monkeypatch.setattr(batches, "FIRST_BATCH", 2)
    base = "the quick brown fox jumps over the lazy dog near the river bank today"
    rows = [{"text": base, "category": "a"}, {"text": "something else entirely different here", "category": "b"},
            {"text": base + " again", "category": "a"}, {"text": base + " again and", "category": "a"}] + [
        {"text": f"filler message number {i} about cards", "category": "ab"[i % 2]} for i in range(20)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = recipe_for(tmp_path, tiny_model_dir, data, input_fields=["text"], target_field="category",
                        batch_rows=100, steps=[{"step": "near_dedup", "threshold": 0.7}])
    build(recipe, tmp_path / "out", Console(file=open(os.devnull, "w")))  # noqa: SIM115
    reasons = {r["source"].rsplit(":", 1)[1]: r["reason"] for r in read_jsonl(tmp_path / "out" / "rejected.jsonl")}
    assert reasons["3"] == f"near duplicate of {data}:1 (similarity 0.93)"  # 13 of 14 word pairs shared
    assert reasons["4"] == f"near duplicate of {data}:3 (similarity 0.93)"  # row 1 shares 13 of 15, row 3 14 of 15


def listing_file(path: Path, n: int) -> Path:
    """``n`` listing rows from the repository's BANKING77 messages (two messages a row, with a price): one in
    ten an exact copy of an earlier row, one in ten an earlier row with one word changed."""
    import csv

    with open(EXAMPLE_CSV, newline="", encoding="utf-8") as fh:
        texts = [r["text"] for r in csv.DictReader(fh)]
    rng, made = random.Random(1), []
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            if i % 10 == 1 and made:
                text = rng.choice(made)
            elif i % 10 == 2 and made:
                words = rng.choice(made).split()
                words[rng.randrange(len(words))] = "changed"
                text = " ".join(words)
            else:
                text = f"{rng.choice(texts)} {rng.choice(texts)}"
            if len(made) < 5_000:
                made.append(text)
            else:
                made[rng.randrange(len(made))] = text
            fh.write(json.dumps({"text": text, "price": f"₹{rng.randrange(10, 90000):,}",
                                 "category": "ab"[i % 2]}) + "\n")
    return path


def peak_kb(tmp_path: Path, model_dir, n: int, **section) -> tuple[int, str]:
    """Peak resident memory (KB) of ``tunesmith data prepare`` on ``n`` listing rows (``section``: more of the
    data section), and what it printed with its output going to a file."""
    data = listing_file(tmp_path / f"rows{n}.jsonl", n)
    recipe = write_recipe(tmp_path / f"r{n}.yaml", {
        "name": f"m{n}", "output_dir": str(tmp_path / "runs"), "seed": 1, "model": {"name": str(model_dir)},
        "data": {"path": str(data), "task": "regression", "input_fields": ["text"], "target_field": "price",
                 "batch_rows": 2_000, "profile": {"enabled": True, "numeric": ["price"]}, "steps": FIVE_STEPS,
                 **section}})
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    log = tmp_path / f"out{n}.txt"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "data", "prepare", str(recipe), "--no-cache"],
                                env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, log.read_text()[-3000:]
    return usage.ru_maxrss, log.read_text()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TUNESMITH_SCALE_TESTS"), reason="4-5 minutes on 2 cores, so outside make "
                    "test: run with TUNESMITH_SCALE_TESTS=1 (the 20% bound is not met yet, see the xfail)")
@pytest.mark.xfail(strict=True, reason="measured: 709 MB at 200k rows vs 566 MB at 20k (+25%); the near-dedup "
                   "index (~140 bytes a row) and the split's positions account for an estimated 30 MB of the 143 MB")
def test_peak_memory_does_not_grow_with_the_rows(tmp_path, tiny_model_dir, home):
    small, _ = peak_kb(tmp_path, tiny_model_dir, 20_000)
    large, _ = peak_kb(tmp_path, tiny_model_dir, 200_000)
    assert large <= small * 1.2, f"peak {large / 1024:.0f} MB at 200k rows vs {small / 1024:.0f} MB at 20k"


def test_progress_lines_appear_when_the_output_is_a_file(tmp_path, tiny_model_dir, home):
    _, printed = peak_kb(tmp_path, tiny_model_dir, 5_000)
    lines = [line for line in printed.splitlines() if line.startswith("prepare: ")]
    assert lines and "rows/s" in lines[0] and "ETA" in lines[0], printed[:2000]
    assert lines[-1].startswith("prepare: 5,000 rows (100%)"), lines[-1]


def test_read_sample_stops_at_its_rows_and_keeps_what_the_stream_reports(tmp_path):
    """``tunesmith init``'s reading: the first rows through the same reader, broken lines with their file:line,
    whether the file ended within them, and the encoding note ``data prepare`` prints."""
    lines = [json.dumps({"text": f"message {i}", "label": "ab"[i % 2]}) for i in range(50)]
    lines[2] = lines[2][:-3]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    head = batches.read_sample(data, "jsonl", rows=10)
    assert (len(head.records), [r.source for r in head.rejected], head.complete, head.note) == (
        10, [f"{data}:3"], False, None)
    assert head.records[-1].source == f"{data}:11"
    whole = batches.read_sample(data, "jsonl", rows=100)
    assert (len(whole.records), len(whole.rejected), whole.complete) == (49, 1, True)
    korean = tmp_path / "k.csv"
    korean.write_bytes("리뷰,label\n정말 최악이에요,부정\n완전 감동했어요,긍정\n".encode("cp949"))
    sample = batches.read_sample(korean, rows=10)
    assert [r.data["리뷰"] for r in sample.records] == ["정말 최악이에요", "완전 감동했어요"] and sample.complete
    assert "decoded as CP949" in sample.note


def late_field_rows(n: int = 3_000, first: int = 1_501) -> list[dict]:
    """BANKING77 rows whose optional field ``note`` first appears at row ``first`` (every third row after it)."""
    import csv

    with open(EXAMPLE_CSV, newline="", encoding="utf-8") as fh:
        texts = [(r["text"], r["category"]) for r in csv.DictReader(fh)]
    rows = []
    for i in range(n):
        text, label = texts[i % len(texts)]
        row = {"text": f"{text} [ref {i}]", "label": label}
        if i + 1 >= first and i % 3 == 0:
            row["note"] = f"  customer   note {i}  <br> "
        rows.append(row)
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("input_fields", [["text"], ["text", "note"]])
def test_a_field_first_seen_at_row_1501_prepares_as_in_memory(input_fields, tmp_path, tiny_model_dir, home):
    """Fields are checked over the whole stream: a step's field, a derived field's and a mapped field first seen
    after the first batch (1,000 rows) are there; a row without one input field keeps it as empty text (an e-mail
    without a subject is still an e-mail), in the stream as in memory."""
    data = write_rows(tmp_path / "late.jsonl", late_field_rows())
    recipe = recipe_for(tmp_path, tiny_model_dir, data, input_fields=input_fields, target_field="label",
                        prompt=" / ".join("{" + f + "}" for f in input_fields), on_error="skip",
                        derive={"both": "{text} {note}"},
                        steps=[{"step": "scrub", "fields": ["text", "note"]},
                               {"step": "exact_dedup", "fields": ["both"]}])
    splits, rejected, rows = in_memory(recipe)
    got = build(recipe, tmp_path / "out", Console(file=open(os.devnull, "w")))  # noqa: SIM115
    for name in ("train", "val", "test"):
        assert [r["id"] for r in read_jsonl(tmp_path / "out" / f"{name}.jsonl")] == [e.id for e in splits[name]]
    assert [(r["source"], r["reason"]) for r in read_jsonl(tmp_path / "out" / "rejected.jsonl")] == sorted(
        ((r.source, r.reason) for r in rejected), key=lambda x: int(x[0].rsplit(":", 1)[1]))
    assert [(r.step, r.kept, r.dropped, r.changed) for r in got.steps] == [
        (r.step, r.kept, r.dropped, r.changed) for r in rows]
    assert rows[0].changed > 400  # the late notes were scrubbed
    assert not [r for r in rejected if "note" in r.reason]
    examples = [e for name in ("train", "val", "test") for e in splits[name]]
    if input_fields == ["text", "note"]:
        assert sum(e.inputs["note"] == "" for e in examples) > 2_000


@pytest.mark.parametrize("where", ["step", "input", "derive"])
def test_a_field_no_row_has_fails_once_the_stream_has_ended(where, tmp_path, tiny_model_dir, home):
    data = write_rows(tmp_path / "late.jsonl", late_field_rows())
    section = {"input_fields": ["text"], "target_field": "label", "on_error": "skip"}
    if where == "step":
        section["steps"] = [{"step": "scrub", "fields": ["text", "nope"]}]
    elif where == "input":
        section.update(input_fields=["text", "nope"], prompt="{text} {nope}")
    else:
        section["derive"] = {"both": "{text} {nope}"}
    recipe = recipe_for(tmp_path, tiny_model_dir, data, **section)
    with pytest.raises(DataError, match=r"no record has the field.*'nope'.*fields present: \['label', 'note', 'text'\]"):
        build(recipe, tmp_path / "out", Console(file=open(os.devnull, "w")))  # noqa: SIM115


def test_allocator_settings_are_scoped_to_the_stage(tmp_path, tiny_model_dir, home):
    import pyarrow as pa

    before = pa.default_memory_pool().backend_name
    data = write_rows(tmp_path / "d.jsonl", late_field_rows(300))
    seen = {}

    def steps_see_the_pool(records, spec, ctx):
        seen["pool"] = pa.default_memory_pool().backend_name
        return records, []

    from tunesmith.config import RegexStep
    from tunesmith.data.steps import curation as steps_module

    recipe = recipe_for(tmp_path, tiny_model_dir, data, input_fields=["text"], target_field="label",
                        steps=[{"step": "regex", "pattern": "x", "action": "drop"}])
    original = steps_module.STEPS[RegexStep]
    steps_module.STEPS[RegexStep] = steps_see_the_pool
    try:
        build(recipe, tmp_path / "out", Console(file=open(os.devnull, "w")))  # noqa: SIM115
    finally:
        steps_module.STEPS[RegexStep] = original
    assert seen["pool"] == "system" and pa.default_memory_pool().backend_name == before


def test_the_split_follows_content_not_position_batch_size_or_run(tmp_path, tiny_model_dir, home, monkeypatch):
    """An example's split is a hash of its content with the seed: the same at any batch size and on a re-run,
    and rows added elsewhere in the file move few of the others (the counts shift by a row or two)."""
    monkeypatch.setattr(batches, "FIRST_BATCH", 7)
    rows = late_field_rows(2_000)
    base = write_rows(tmp_path / "a.jsonl", rows)
    more = write_rows(tmp_path / "b.jsonl", late_field_rows(40)[::-1] + rows)  # 40 rows put in front

    def split_of(data, batch_rows, out):
        recipe = recipe_for(tmp_path, tiny_model_dir, data, input_fields=["text"], target_field="label",
                            batch_rows=batch_rows, split={"train": 0.8, "val": 0.1, "test": 0.1, "stratify": False})
        build(recipe, tmp_path / out, Console(file=open(os.devnull, "w")))  # noqa: SIM115
        lines = {name: (tmp_path / out / f"{name}.jsonl").read_bytes() for name in ("train", "val", "test")}
        return lines, {json.dumps(r["messages"]): name for name in lines
                       for r in read_jsonl(tmp_path / out / f"{name}.jsonl")}

    files, a = split_of(base, 100, "a")
    assert split_of(base, 20_000, "b")[0] == files and split_of(base, 100, "c")[0] == files
    _, b = split_of(more, 100, "d")
    moved = sum(a[k] != b[k] for k in a)
    assert moved <= 0.02 * len(a), moved
