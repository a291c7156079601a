"""Evals moved between two OpenAI-compatible servers through a folder: ``save`` keeps every eval of an account
(its definition, its runs, each run's output items with their grades, and the data files its runs read) in
plain JSON files; ``load`` creates those evals, with their data files, on another server (tunesmith's).

Written for teams whose hosted evals close: ``tunesmith evals save`` against api.openai.com keeps the history
(results stay readable in the folder after the hosted service is gone), ``tunesmith evals load`` against
``tunesmith serve`` recreates the definitions to run there on a fine-tuned model.

The folder::

    evals.jsonl                         one eval object per line, as the source server returned it
    runs/EVAL_ID.jsonl                  the eval's runs, as returned
    output_items/RUN_ID.jsonl           a run's output items (samples, grader results)
    files/FILE_ID.jsonl                 a data file a run read (``data_source.source.file_id``)
    skipped.jsonl                       what could not be saved or loaded, with the reason
    loaded.json                         after ``load``: source id -> new id, so a second load goes on where one stopped

Only ``custom`` data sources can be recreated (logs and stored completions live with the source's provider):
the others are saved, and listed in skipped.jsonl with the reason when loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from tunesmith.data.prepare import append_jsonl, write_jsonl

Bar = Callable[[str, int], object]  # (description, total) -> a context manager yielding advance(n, info=...)


def _no_bar(description: str, total: int):
    return nullcontext(lambda *a, **k: None)


def _dump(obj) -> dict:
    """An API object as the server sent it (fields under their wire names, e.g. ``schema``)."""
    return obj.model_dump(mode="json", by_alias=True, exclude_none=True) if hasattr(obj, "model_dump") else dict(obj)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _skip(folder: Path, what: str, ident: str, why: str) -> None:
    append_jsonl(folder / "skipped.jsonl", [{"what": what, "id": ident, "why": why}])


def save_evals(client, folder: Path, bar: Bar = _no_bar) -> dict:
    """Every eval the client's key sees, with runs, output items and the runs' data files, into ``folder``.
    Returns the counts saved. A file the source will not hand out is listed in skipped.jsonl, not fatal."""
    folder.mkdir(parents=True, exist_ok=True)
    evals = [_dump(e) for e in client.evals.list(limit=100)]  # the client pages through every eval
    write_jsonl(folder / "evals.jsonl", evals)
    counts = {"evals": len(evals), "runs": 0, "output_items": 0, "files": 0, "skipped": 0}
    with bar("saving evals", len(evals)) as advance:
        for ev in evals:
            _save_runs(client, folder, ev, counts)
            advance(1, info=ev.get("name") or ev["id"])
    return counts


def _save_runs(client, folder: Path, ev: dict, counts: dict) -> None:
    """One eval's runs, their output items and the data files they read."""
    runs = [_dump(r) for r in client.evals.runs.list(ev["id"], limit=100)]
    counts["runs"] += write_jsonl(folder / "runs" / f"{ev['id']}.jsonl", runs)
    for run in runs:
        items = (_dump(o) for o in client.evals.runs.output_items.list(run["id"], eval_id=ev["id"], limit=100))
        counts["output_items"] += write_jsonl(folder / "output_items" / f"{run['id']}.jsonl", items)
        file_id = run_file_id(run)
        if file_id and not (folder / "files" / f"{file_id}.jsonl").is_file():
            counts["files" if _save_file(client, folder, file_id) else "skipped"] += 1


def _save_file(client, folder: Path, file_id: str) -> bool:
    """A run's data file into files/; one the source will not hand out is listed in skipped.jsonl."""
    try:
        content = client.files.content(file_id).read()
    except Exception as exc:  # noqa: BLE001 - listed with the reason, the rest goes on
        _skip(folder, "file", file_id, f"the source did not return it: {exc}")
        return False
    (folder / "files").mkdir(exist_ok=True)
    (folder / "files" / f"{file_id}.jsonl").write_bytes(content)
    return True


def run_file_id(run: dict) -> str | None:
    """The data file a run read, when its source is an uploaded file."""
    source = (run.get("data_source") or {}).get("source") or {}
    return source.get("id") if source.get("type") == "file_id" else None


def create_config(stored: dict) -> dict | None:
    """An eval's stored ``data_source_config`` in the form ``evals.create`` takes; None for a kind that cannot
    be recreated (logs, stored completions)."""
    if stored.get("type") != "custom":
        return None
    properties = (stored.get("schema") or {}).get("properties") or {}
    return {"type": "custom", "item_schema": properties.get("item") or {"type": "object"},
            "include_sample_schema": "sample" in properties}


def load_evals(client, folder: Path, bar: Bar = _no_bar) -> dict:
    """Create every saved eval (and upload every saved data file) on the client's server; ``loaded.json`` maps
    each source id to its new id and is written after each one, so a load that stops goes on where it was."""
    evals = _read_jsonl(folder / "evals.jsonl")
    if not evals:
        from tunesmith.errors import DataError

        raise DataError(f"{folder / 'evals.jsonl'}: no saved evals here; run `tunesmith evals save {folder}` first")
    mapping_path = folder / "loaded.json"
    mapping = json.loads(mapping_path.read_text(encoding="utf-8")) if mapping_path.is_file() else {}
    counts = {"evals": 0, "files": 0, "already": 0, "skipped": 0}
    for path in sorted((folder / "files").glob("*.jsonl")) if (folder / "files").is_dir() else []:
        if path.stem in mapping:
            continue
        with path.open("rb") as fh:
            mapping[path.stem] = client.files.create(file=(path.name, fh), purpose="evals").id
        counts["files"] += 1
        _save_mapping(mapping_path, mapping)
    with bar("loading evals", len(evals)) as advance:
        for ev in evals:
            counts[_load_one(client, folder, ev, mapping)] += 1
            _save_mapping(mapping_path, mapping)
            advance(1, info=ev.get("name") or ev["id"])
    return counts


def _save_mapping(path: Path, mapping: dict) -> None:
    """loaded.json, written after each created object, so a stopped load goes on where it was."""
    path.write_text(json.dumps(mapping, indent=1), encoding="utf-8")


def _load_one(client, folder: Path, ev: dict, mapping: dict) -> str:
    """Create one saved eval unless it was loaded before; returns which count it adds to."""
    if ev["id"] in mapping:
        return "already"
    config = create_config(ev.get("data_source_config") or {})
    if config is None:
        kind = (ev.get("data_source_config") or {}).get("type")
        _skip(folder, "eval", ev["id"], f"data_source_config.type {kind!r} cannot be recreated here (only 'custom'); "
              "its definition and results stay in the folder")
        return "skipped"
    criteria = [{k: v for k, v in c.items() if k != "id"} for c in ev.get("testing_criteria") or []]
    named = {"name": ev["name"]} if ev.get("name") else {}
    made = client.evals.create(data_source_config=config, testing_criteria=criteria,
                               metadata={**(ev.get("metadata") or {}), "source_eval_id": ev["id"]}, **named)
    mapping[ev["id"]] = made.id
    return "evals"
