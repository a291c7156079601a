"""The data stage of a run: read → curation steps → examples → split → write (→ profile, exports), over a
stream of batches (``batches.py``, ``stream.py``), so memory does not grow with the rows beyond the dedup
index and one integer per kept row for the split.

Prepared data is cached under ``$TUNESMITH_HOME/cache/data/<key>``; the key covers the input
bytes, the recipe's data section (plus seed and model), the tokenizer files and the code, so a
change to any of them rebuilds and an unchanged recipe copies the finished files back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import secrets
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from rich.console import Console

from tunesmith.config import Recipe
from tunesmith.data.engines import stream
from tunesmith.data.engines.outputs import LocalOutput, rejects_from
from tunesmith.data.engines.stream import (
    Curated,
    ExampleMapper,
    HeadSteps,
    StepChain,
    in_read_order,
    release_freed,
    stage_memory,
)
from tunesmith.data.read.batches import stream_source
from tunesmith.data.read.readers import encoding_note
from tunesmith.data.steps.curation import StepContext, summary_table, token_limits
from tunesmith.data.steps.examples import labels_of, refuse_test_targets, unusable_target
from tunesmith.data.steps.split import SPLITS, split_codes
from tunesmith.errors import DataError
from tunesmith.hashing import update_with
from tunesmith.paths import tunesmith_home
from tunesmith.progress import rate_bar
from tunesmith.records import Example, Rejected

CACHE_FORMAT = 3


@dataclass
class PreparedData:
    splits: dict[str, list[Example]]
    labels: list[str]
    summary: dict[str, int]
    rejected: int
    steps: list = field(default_factory=list)
    cached: bool = False


def write_jsonl(path: Path, rows) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            n += 1
    return n


def append_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def tokenizer_loader(recipe: Recipe):
    def load():
        from tunesmith.data.tokens import data_tokenizer

        return data_tokenizer(recipe.model.name)

    return load


def prepare(recipe: Recipe, data_dir: Path, console: Console, use_cache: bool | None = None) -> PreparedData:
    """Run the data stage into ``data_dir``; reuse the cache when nothing it depends on changed."""
    cfg = recipe.data
    use_cache = cfg.cache if use_cache is None else use_cache
    key = cache_key(recipe) if use_cache else None
    if key:
        hit = load_cached(key, data_dir)
        if hit is not None:
            console.print(f"prepared data from the cache ({key[:12]}) → {data_dir}")
            if hit.rejected:
                where = data_dir / "rejected.jsonl"
                console.print(f"[yellow]{hit.rejected} record(s) set aside[/] → {where}")
            return hit
    data = build(recipe, data_dir, console)
    if key:
        store_cached(key, data_dir, data)
    return data


def build(recipe: Recipe, data_dir: Path, console: Console) -> PreparedData:
    """Stream every source through the steps into ``data_dir``: rejected rows and kept examples are written
    as they come, the split is made from each example's content hash and the split files are cut at the end."""
    cfg = recipe.data
    ctx = StepContext(tokenizer=tokenizer_loader(recipe), on_error=cfg.on_error)
    files = split_files(cfg)
    data_dir.mkdir(parents=True, exist_ok=True)
    split_cfg = _split_section(cfg)
    with stage_memory(), engine_session(cfg), tempfile.TemporaryDirectory(dir=data_dir, prefix=".work-") as work, \
            engine_output(cfg, data_dir, Path(work), recipe.seed, split_cfg) as out:
        parts = {
            name: curate(cfg.model_copy(update={"path": path}) if path else cfg, ctx, console,
                         data_dir / "profile" if name in ("all", "train") else None, out, Path(work) / name, name)
            for name, path in files.items()
        }
        n_read = sum(p.n_read for p in parts.values())
        n_rejected = sum(p.n_rejected for p in parts.values())
        n_examples = sum(len(p.examples) for p in parts.values())
        if n_read != n_examples + n_rejected:  # invariant: nothing disappears
            raise AssertionError(f"{n_read} read but {n_examples} kept + {n_rejected} rejected")
        if n_rejected:
            console.print(f"[yellow]{n_rejected} record(s) set aside[/] → {data_dir / 'rejected.jsonl'}")
        if not n_examples:
            raise DataError(f"{cfg.path or cfg.hub.name}: no usable examples (read {n_read}, rejected {n_rejected})")
        splits, notes = out.split({k: p.examples for k, p in parts.items()},
                                  partial(assign_splits, cfg=cfg, split_cfg=split_cfg, seed=recipe.seed))
    test_notes = test_file_rows(data_dir / "rejected.jsonl", files["test"]) if "test" in files else {}
    rows = [r for p in parts.values() for r in p.rows]
    labels = labels_of(set().union(*(p.targets for p in parts.values())), cfg)
    if not splits.count("test"):
        raise DataError("the test split is empty; give data.split.test a size > 0")
    if rows:
        (data_dir / "steps.md").write_text(summary_table(rows) + "\n", encoding="utf-8")
    summary = {
        "rows read": n_read,
        "rejected (see data/rejected.jsonl)": n_rejected,
        "examples": n_examples,
        **({"labels": len(labels)} if labels else {}),
        "train": splits.count("train"),
        "val": splits.count("val"),
        "test": splits.count("test"),
        "not used (split sizes smaller than the data)": splits.count("unused"),
        **notes,
        **test_notes,
    }
    if cfg.engine == "ray":
        summary["Ray nodes that curated"] = len(set().union(*(p.nodes for p in parts.values())))
    for r in rows:
        key = f"step {r.step}: dropped"
        summary[key] = summary.get(key, 0) + r.dropped
    data = PreparedData(splits, labels, summary, n_rejected, rows)
    if cfg.export:
        from tunesmith.data.formats.exporters import export_splits

        export_splits(splits, cfg, data_dir / "export")
    return data


def engine_session(cfg):
    """Ray for the stage with ``data.engine: ray`` (attached or started, stopped if started); else nothing."""
    if cfg.engine != "ray":
        return contextlib.nullcontext()
    from tunesmith.data.engines.ray_engine import ray_session

    return ray_session(cfg.ray_address)


TEST_SET_ASIDE = "test rows set aside (see data/rejected.jsonl)"


def test_file_rows(rejected_path: Path, path) -> dict:
    """A test file's rows are the user's to score: one with a target that cannot be used is an error naming every
    such row (never a silent cut); the others set aside (no input text, unreadable, dropped by a step) are counted
    with their reasons for the report's verdict line. Read back from ``rejected.jsonl`` (written by either engine)."""
    prefix = rejects_from(path)
    reasons: Counter = Counter()
    bad = []
    with open(rejected_path, "rb") as fh:
        for line in fh:
            if not line.startswith(prefix):
                continue
            doc = json.loads(line)
            r = Rejected(doc["source"], doc["stage"], doc["reason"])
            reasons[reason_kind(r.reason)] += 1
            if unusable_target(r):
                bad.append(r)
    refuse_test_targets(path, bad)
    if not reasons:
        return {}
    return {TEST_SET_ASIDE: "; ".join(f"{v:,} with {k}" for k, v in reasons.most_common())}


def reason_kind(reason: str) -> str:
    """A reason without what differs from row to row (numbers, what the line starts with), to count rows by it."""
    return re.sub(r"\d+", "#", reason.split(";")[0])[:100]


def engine_output(cfg, data_dir: Path, work: Path, seed: int, split_cfg):
    """Where the engine writes curated rows: this process's files, or the Ray workers' (``data.engine: ray``)."""
    if cfg.engine == "ray":
        from tunesmith.data.engines.ray_engine import RayOutput

        return contextlib.closing(RayOutput(data_dir, work, cfg, seed, split_cfg))
    return contextlib.closing(LocalOutput(data_dir, work, cfg, seed, split_cfg))


def curate(cfg, ctx: StepContext, console: Console, profile_dir: Path | None, out, workdir: Path,
           name: str = "all") -> Curated:
    """Stream one source: profile each batch as read (before curation, so the plots show what the limits will
    cut), run it through the curation steps (here, or on Ray with ``data.engine: ray``), map the survivors to
    examples and write both kinds out."""
    workdir.mkdir(parents=True, exist_ok=True)
    if cfg.path is not None and (note := encoding_note(cfg.path)):
        console.print(note)
    profile_dir = profile_dir if cfg.profile.enabled else None
    if cfg.engine == "ray":  # the workers profile, curate and write
        from tunesmith.data.engines.ray_engine import curate_on_ray

        return curate_on_ray(cfg, ctx, console, profile_dir, out, name)
    sketch = _profile_sketch(cfg, ctx) if profile_dir is not None else None
    done = _curate_here(cfg, ctx, console, sketch, out, workdir, name)
    if sketch is not None:
        sketch.write(profile_dir, limits=token_limits(cfg.steps))
    return done


def _curate_here(cfg, ctx: StepContext, console: Console, sketch, out: LocalOutput, workdir: Path,
                 name: str) -> Curated:
    """The local engine: the batches through a ``StepChain`` in this process, the recipe's fields checked once
    the stream has ended."""
    chain, mapper = StepChain(cfg.steps, ctx, workdir), ExampleMapper(cfg)
    start, counts, targets = len(out), {"read": 0, "rejected": 0}, set()
    uses_labels = bool(labels_of({"x"}, cfg))

    def emit(records, rejected, rank) -> None:
        examples, unmapped = mapper(records)
        out.write(examples, in_read_order(rejected + unmapped, rank))
        counts["rejected"] += len(rejected) + len(unmapped)
        if uses_labels:
            targets.update(e.target for e in examples)

    def read():
        for batch in stream_source(cfg, ctx.tok):
            counts["read"] += len(batch.records) + len(batch.rejected)
            if sketch is not None:
                sketch.add(batch.records)
            yield batch

    large = cfg.path is not None and Path(cfg.path).is_file() and Path(cfg.path).stat().st_size >= stream.HELPER_BYTES
    head = HeadSteps(chain, ctx) if large and chain.head() else None
    try:
        with rate_bar(console, "prepare" if name == "all" else f"prepare {name}") as update:
            batches = head.run(read()) if head else ((b, b.records, [], {}) for b in read())
            for batch, kept, dropped, keys in batches:
                kept, more = chain.push(kept, head.n if head else 0, keys)
                emit(kept, batch.rejected + dropped + more, batch.rank())
                release_freed()
                update(counts["read"], batch.fraction, f"{len(out) - start:,} kept")
            if head:
                head.close()
                head = None
            for kept, dropped, rank in chain.finish():
                emit(kept, dropped, rank)
        chain.check()
        mapper.check(str(cfg.path or cfg.hub.name))
    finally:
        if head:
            head.stop()
        chain.close()
    return Curated(range(start, len(out)), counts["rejected"], chain.rows, counts["read"], targets)


def _profile_sketch(cfg, ctx: StepContext):
    from tunesmith.data.profile import sketch_for

    return sketch_for(cfg, ctx.tok)


def _split_section(cfg):
    from tunesmith.config.kinds import kind_class

    stratify = kind_class(cfg.task).stratify and cfg.split.stratify
    return cfg.split.model_copy(update={"stratify": stratify})


SPLIT_FILE_ROLES = {"train": "the training split", "val": "the validation split", "test": "the official test split"}


def split_files(cfg) -> dict[str, Path | None]:
    """The sources to read: ``{"all": None}`` (data.path / data.hub, split later) or one per split file."""
    if cfg.splits is None:
        return {"all": None}
    files = {k: getattr(cfg.splits, k) for k in ("train", "val", "test") if getattr(cfg.splits, k)}
    for name, path in files.items():
        if not Path(path).exists():
            raise DataError(missing_file_message(cfg, f"data.splits.{name}", Path(path), SPLIT_FILE_ROLES[name]))
    return files


def missing_file_message(cfg, key: str, path: Path, role: str) -> str:
    about = f" It is {cfg.description.strip()}" if cfg.description.strip() else ""
    return f"{key}: file not found: {path} ({role}).{about}"


def assign_splits(parts: dict[str, range], read_keys, cfg, split_cfg, seed: int) -> tuple[np.ndarray, dict]:
    """Each example's split code (``split.SPLITS``) from its keys (``read_keys(part)`` → ``SplitKeys``): one source
    split with data.split, or split files taken as given, a missing val or test file carved (seeded by content,
    stratified for classification: ``split_cfg``) out of the train file, and the summary says so."""
    codes = np.full(max((p.stop for p in parts.values()), default=0), SPLITS.index("unused"), dtype=np.uint8)
    if "all" in parts:
        codes[_at(parts["all"])] = split_codes(read_keys(parts["all"]), split_cfg, seed)
        return codes, {}
    for name in ("val", "test"):
        if name in parts:
            codes[_at(parts[name])] = SPLITS.index(name)
    train = parts.get("train")
    if not train:  # a synth stage makes the training data
        return codes, {"train split": "none given: made by the synth stage"}
    codes[_at(train)] = SPLITS.index("train")
    notes = {}
    carve_val = "val" not in parts and cfg.split.val > 0
    carve_test = "test" not in parts
    if carve_val or carve_test:
        test = (cfg.split.test if "test" in cfg.split.model_fields_set else 0.2) if carve_test else 0
        val = cfg.split.val if carve_val else 0
        if test >= 1 or val >= 1:
            raise DataError("with data.splits, data.split.val/test are fractions of the train file (below 1)")
        held = split_codes(read_keys(train), split_cfg.model_copy(update={"train": 1 - val - test, "val": val,
                                                                         "test": test}), seed)
        codes[_at(train)] = held
        if carve_test:
            notes["test held out from the train file (no test file given)"] = \
                f"{int((held == SPLITS.index('test')).sum())} ({test:.0%})"
        if carve_val:
            notes["val held out from the train file"] = int((held == SPLITS.index("val")).sum())
    return codes, notes


def _at(part: range) -> slice:
    return slice(part.start, part.stop)



# --- cache ------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$TUNESMITH_DATA_CACHE``, else ``$TUNESMITH_HOME/cache/data``."""
    return Path(os.environ.get("TUNESMITH_DATA_CACHE") or tunesmith_home() / "cache" / "data")


def cache_key(recipe: Recipe) -> str:
    """sha256 over input bytes, data section + seed + model, tokenizer files and the package code."""
    from tunesmith import __version__
    from tunesmith.models.names import resolve

    h = hashlib.sha256(f"format {CACHE_FORMAT} tunesmith {__version__}".encode())
    cfg = recipe.data
    if cfg.path is not None and cfg.splits is None:
        if not Path(cfg.path).exists():
            raise DataError(missing_file_message(cfg, "data.path", Path(cfg.path), "the data file"))
        update_with(h, Path(cfg.path))
    for path in split_files(cfg).values():
        if path is not None:
            update_with(h, Path(path))
    h.update(cfg.model_dump_json().encode())
    h.update(f"seed={recipe.seed} model={recipe.model.name}".encode())
    try:
        ref = Path(resolve(recipe.model.name))
    except Exception:  # an unknown name fails later, when the tokenizer is loaded
        ref = Path(recipe.model.name)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (ref / name).is_file():
            update_with(h, ref / name)
    update_with(h, Path(__file__).resolve().parent.parent)  # the package's own code
    return h.hexdigest()


def store_cached(key: str, data_dir: Path, data: PreparedData) -> None:
    """The prepared data kept under ``key``: written aside under a name of this process's own, then renamed in
    place. Processes sharing the cache (two test workers, two runs) may store the same key at once: the first
    rename wins, and the other's copy, the same data, is dropped."""
    target = cache_dir() / key
    tmp = target.with_name(f".{key}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        shutil.copytree(data_dir, tmp / "files")
        with open(tmp / "prepared.pkl", "wb") as fh:
            pickle.dump(_to_columns(data), fh, protocol=pickle.HIGHEST_PROTOCOL)
        shutil.rmtree(target, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:  # another process put the same entry in place first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prune_cache()


def prune_cache(keep: int = 20) -> None:
    """Keep the ``keep`` most recently used entries; older ones are removed (an entry another process removes
    meanwhile is passed over)."""
    entries = []
    for p in cache_dir().iterdir():
        try:
            if p.is_dir() and not p.name.startswith("."):
                entries.append((p.stat().st_mtime, p))
        except FileNotFoundError:
            continue
    for _, old in sorted(entries, reverse=True)[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def _to_columns(data: PreparedData) -> dict:
    """What the cache keeps besides the files: the splits as positions into examples.jsonl."""
    return {
        "splits": data.splits,
        "labels": data.labels,
        "summary": data.summary,
        "rejected": data.rejected,
        "steps": data.steps,
    }


def _from_columns(doc: dict, data_dir: Path) -> PreparedData:
    splits = doc["splits"].moved(data_dir / "examples.jsonl")
    return PreparedData(splits, doc["labels"], doc["summary"], doc["rejected"], doc["steps"])


def load_cached(key: str, data_dir: Path) -> PreparedData | None:
    entry = cache_dir() / key
    if not (entry / "prepared.pkl").is_file():
        return None
    try:
        with open(entry / "prepared.pkl", "rb") as fh:
            data = _from_columns(pickle.load(fh), data_dir)
    except Exception:  # a damaged entry is rebuilt, never trusted
        return None
    if data_dir.exists():
        for stale in ("rejected.jsonl", "steps.md", "profile", "export"):
            p = data_dir / stale
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    try:
        shutil.copytree(entry / "files", data_dir, dirs_exist_ok=True)
        entry.touch()  # most recently used, for pruning
    except (FileNotFoundError, shutil.Error):  # pruned by another process meanwhile: prepared again
        return None
    data.cached = True
    return data
