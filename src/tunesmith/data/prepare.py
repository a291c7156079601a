"""The data stage of a run: read → curation steps → examples → split → write (→ profile, exports).

Prepared data is cached under ``$TUNESMITH_HOME/cache/data/<key>``; the key covers the input
bytes, the recipe's data section (plus seed and model), the tokenizer files and the code, so a
change to any of them rebuilds and an unchanged recipe copies the finished files back.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from tunesmith.config import Recipe
from tunesmith.data.examples import label_set, to_examples
from tunesmith.data.formatting import chat_messages
from tunesmith.data.readers import encoding_note
from tunesmith.data.sources import read_source
from tunesmith.data.split import split_examples
from tunesmith.data.steps import StepContext, run_steps, summary_table
from tunesmith.errors import DataError
from tunesmith.hashing import update_with
from tunesmith.paths import tunesmith_home
from tunesmith.progress import task_bar
from tunesmith.records import Example

CACHE_FORMAT = 1


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
        from tunesmith.models.loading import load_tokenizer

        return load_tokenizer(recipe.model.name)

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
    cfg = recipe.data
    ctx = StepContext(tokenizer=tokenizer_loader(recipe), on_error=cfg.on_error)
    files = split_files(cfg)
    parts = {
        name: curate(cfg.model_copy(update={"path": path}) if path else cfg, ctx, console,
                     data_dir / "profile" if name in ("all", "train") else None)
        for name, path in files.items()
    }
    n_read = sum(p.n_read for p in parts.values())
    rejected = [r for p in parts.values() for r in p.rejected]
    examples = [e for p in parts.values() for e in p.examples]
    rows = [r for p in parts.values() for r in p.rows]
    if n_read != len(examples) + len(rejected):  # invariant: nothing disappears
        raise AssertionError(f"{n_read} read but {len(examples)} kept + {len(rejected)} rejected")
    data_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(data_dir / "rejected.jsonl", (r.to_json() for r in rejected))
    if rejected:
        console.print(f"[yellow]{len(rejected)} record(s) set aside[/] → {data_dir / 'rejected.jsonl'}")
    if not examples:
        raise DataError(
            f"{cfg.path or cfg.hub.name}: no usable examples (read {n_read}, rejected {len(rejected)})"
        )
    labels = label_set(examples, cfg)
    splits, notes = assign_splits({k: p.examples for k, p in parts.items()}, cfg, recipe.seed)
    if not splits["test"]:
        raise DataError("the test split is empty; give data.split.test a size > 0")
    for name in ("train", "val", "test"):
        write_jsonl(
            data_dir / f"{name}.jsonl",
            (
                {"id": e.id, "messages": chat_messages(e, cfg) + [{"role": "assistant", "content": e.target}]}
                for e in splits[name]
            ),
        )
    if rows:
        (data_dir / "steps.md").write_text(summary_table(rows) + "\n", encoding="utf-8")
    summary = {
        "rows read": n_read,
        "rejected (see data/rejected.jsonl)": len(rejected),
        "examples": len(examples),
        **({"labels": len(labels)} if labels else {}),
        "train": len(splits["train"]),
        "val": len(splits["val"]),
        "test": len(splits["test"]),
        "not used (split sizes smaller than the data)": len(splits["unused"]),
        **notes,
    }
    for r in rows:
        key = f"step {r.step}: dropped"
        summary[key] = summary.get(key, 0) + r.dropped
    data = PreparedData(splits, labels, summary, len(rejected), rows)
    if cfg.export:
        from tunesmith.data.exporters import export_splits

        export_splits(splits, cfg, data_dir / "export")
    return data


@dataclass
class Curated:
    examples: list[Example]
    rejected: list
    rows: list
    n_read: int


def curate(cfg, ctx: StepContext, console: Console, profile_dir: Path | None) -> Curated:
    """Read one source, profile it (before curation, so the plots show what the limits will cut),
    run the curation steps and map the survivors to examples."""
    records, rejected = read_source(cfg, ctx.tok)
    if cfg.path is not None and (note := encoding_note(cfg.path)):
        console.print(note)
    n_read = len(records) + len(rejected)
    if cfg.profile.enabled and profile_dir is not None:
        from tunesmith.data.profile import profile_records

        profile_records(records, cfg, ctx.tok, profile_dir, limits=_token_limits(cfg))
    kept, dropped, rows = records, [], []
    if cfg.steps:
        with task_bar(console, "curate", len(cfg.steps)) as advance:
            kept, dropped, rows = run_steps(
                records,
                cfg.steps,
                ctx,
                lambda r: advance(1, f"{r.step}: kept {r.kept:,}, dropped {r.dropped:,}"),
            )
    examples, unmapped = to_examples(kept, cfg)
    return Curated(examples, rejected + dropped + unmapped, rows, n_read)


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


def assign_splits(parts: dict[str, list[Example]], cfg, seed: int) -> tuple[dict[str, list[Example]], dict]:
    """Split one source with data.split, or take split files as given; a missing val or test file is
    carved (seeded, stratified for classification) out of the train file and the summary says so."""
    from tunesmith.config.kinds import kind_class

    stratify = kind_class(cfg.task).stratify and cfg.split.stratify
    split_cfg = cfg.split.model_copy(update={"stratify": stratify})
    if "all" in parts:
        return split_examples(parts["all"], split_cfg, seed), {}
    out = {"train": parts.get("train", []), "val": parts.get("val", []), "test": parts.get("test", []), "unused": []}
    notes = {}
    if not out["train"]:  # a synth stage makes the training data
        return out, {"train split": "none given: made by the synth stage"}
    carve_val = "val" not in parts and cfg.split.val > 0
    carve_test = "test" not in parts
    if carve_val or carve_test:
        test = (cfg.split.test if "test" in cfg.split.model_fields_set else 0.2) if carve_test else 0
        val = cfg.split.val if carve_val else 0
        if test >= 1 or val >= 1:
            raise DataError("with data.splits, data.split.val/test are fractions of the train file (below 1)")
        held = split_examples(parts["train"], split_cfg.model_copy(update={"train": 1 - val - test, "val": val,
                                                                          "test": test}), seed)
        out["train"], out["unused"] = held["train"], held["unused"]
        if carve_test:
            out["test"] = held["test"]
            notes["test held out from the train file (no test file given)"] = f"{len(held['test'])} ({test:.0%})"
        if carve_val:
            out["val"] = held["val"]
            notes["val held out from the train file"] = len(held["val"])
    return out, notes


def _token_limits(cfg) -> tuple[int | None, int | None]:
    for spec in cfg.steps:
        if spec.step == "token_length":
            return spec.min or None, spec.max
    return None, None


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
    target = cache_dir() / key
    tmp = target.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(data_dir, tmp / "files")
    with open(tmp / "prepared.pkl", "wb") as fh:
        pickle.dump(_to_columns(data), fh, protocol=pickle.HIGHEST_PROTOCOL)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    prune_cache()


def prune_cache(keep: int = 20) -> None:
    """Keep the ``keep`` most recently used entries; older ones are removed."""
    entries = sorted(
        (p for p in cache_dir().iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def _to_columns(data: PreparedData) -> dict:
    """Examples as plain tuples: much faster to unpickle than dataclass instances."""
    splits = {k: [(e.id, e.inputs, e.target, e.meta) for e in v] for k, v in data.splits.items()}
    return {
        "splits": splits,
        "labels": data.labels,
        "summary": data.summary,
        "rejected": data.rejected,
        "steps": data.steps,
    }


def _from_columns(doc: dict) -> PreparedData:
    splits = {k: [Example(*t) for t in v] for k, v in doc["splits"].items()}
    return PreparedData(splits, doc["labels"], doc["summary"], doc["rejected"], doc["steps"])


def load_cached(key: str, data_dir: Path) -> PreparedData | None:
    entry = cache_dir() / key
    if not (entry / "prepared.pkl").is_file():
        return None
    gc.disable()  # the collector would walk the half-built object graph again and again
    try:
        with open(entry / "prepared.pkl", "rb") as fh:
            data = _from_columns(pickle.load(fh))
    except Exception:  # a damaged entry is rebuilt, never trusted
        return None
    finally:
        gc.enable()
    if data_dir.exists():
        for stale in ("rejected.jsonl", "steps.md", "profile", "export"):
            p = data_dir / stale
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    shutil.copytree(entry / "files", data_dir, dirs_exist_ok=True)
    entry.touch()  # most recently used, for pruning
    data.cached = True
    return data
