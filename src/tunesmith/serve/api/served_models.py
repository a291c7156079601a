"""The models one replica serves: fine-tunes resolved by name from the shared store on first use, kept loaded in a
bounded cache, the least recently used evicted.

Every replica started on the same store and data folder serves the same models: the base model, its aliases and
the command-line adapters (fixed, served to every key), and each key's fine-tunes and checkpoints, which any replica
finds by name in the store (the job or checkpoint row names its owner and its folder on the shared data folder; a
Tinker sampler checkpoint is served by its ``tinker://`` path)
and loads at the first request for them. A model deleted on one replica is marked in the store, so every other
replica refuses it at its next request and unloads it. At most ``capacity`` fine-tunes stay loaded; past it, the
least recently asked one goes, except one asked for within the request timeout (a request still running may use
it), so the bound can be passed for a moment but never a running request's model unloaded.

Resolving costs one indexed lookup per request for a fine-tune (none for the base model); it runs where the
request is planned (a load is part of planning), and listing, retrieving and deleting models in the store lane:
never on the event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path

from tunesmith.models.heads import read_head_meta
from tunesmith.serve.store.objects import TINKER_SCHEME as SCHEME

log = logging.getLogger("tunesmith.serve")
CAPACITY = 8  # fine-tunes one replica keeps loaded by default (ServeSettings.fine_tunes_loaded)


class ServedModels:
    """Which models a replica answers for, and which key may ask each (``app.state.models``)."""

    def __init__(self, engine, store, capacity: int = CAPACITY, in_use_s: float = 300.0):
        self.engine, self.store, self.capacity, self.in_use_s = engine, store, capacity, in_use_s
        self.lock = threading.RLock()
        self.loaded: OrderedDict[str, float] = OrderedDict()  # fine-tune -> when last asked, least recent first
        self.owners: dict[str, str | None] = {}  # a loaded fine-tune -> its owner
        self.parents: dict[str, str] = {}  # a fine-tune continued from another -> that one (models.list's parent)
        self.folders: dict[str, str] = {}  # a fine-tune seen in the store -> its folder
        self.versions: dict[str, tuple] = {}  # a loaded Tinker checkpoint -> its weights file's identity when loaded

    # --- what a key sees ----------------------------------------------------------------------

    def fixed(self) -> list[str]:
        """The base model, aliases, command-line adapters and heads: served to every key."""
        return [m for m in self.engine.model_ids() if m not in self.owners]

    def listed(self, key: str | None) -> list[str]:
        """``models.list`` for ``key``: the fixed models and its fine-tunes, as the store has them (the same on every
        replica), whether or not this replica has loaded them yet."""
        mine = {j["fine_tuned_model"]: (folder, j.get("parent_model")) for j in self.store.fine_tunes_of(key)
                if (folder := _folder(j)) is not None}
        mine |= {c["path"]: (c["folder"], None) for c in self.store.sampler_checkpoints_of(key)}
        self.parents.update({name: parent for name, (_, parent) in mine.items() if parent})
        self.folders.update({name: folder for name, (folder, _) in mine.items()})
        return [*self.fixed(), *mine]

    def head_kind(self, name: str) -> str | None:
        """A trained head's kind (classifier, regression, span), loaded or not; None for a generative model."""
        if name in self.engine.heads:
            return self.engine.heads[name].kind
        folder = self.folders.get(name)
        meta = read_head_meta(Path(folder)) if folder is not None else None
        return meta["head"] if meta else None

    def owned(self, name: str, key: str | None) -> bool:
        """Whether ``name`` is a fine-tune or checkpoint of ``key`` still kept (found in the store; not loaded)."""
        found = self._find(name)
        return found is not None and found[0] == key

    # --- serving ------------------------------------------------------------------------------

    def resolve(self, name: str, key: str | None) -> bool:
        """Whether ``name`` is served to ``key`` now: a fixed model, or a fine-tune of ``key``'s found in the store,
        loaded here if it was not. A fine-tune deleted meanwhile (on any replica) is unloaded and refused."""
        if name in self.fixed():
            return True
        found = self._find(name)
        if found is None:
            self.forget(name)  # deleted (maybe on another replica), or its folder gone
            return False
        owner, folder, parent = found
        if owner != key:
            return False
        version = weights_version(name, folder)
        with self.lock:
            if name in self.owners and self.versions.get(name) != version:  # a checkpoint saved again at its path
                self.forget(name)
            if name not in self.owners:
                self._make_room()
                self.owners = {**self.owners, name: owner}  # first: a reader never takes it for a fixed model
                try:
                    self.engine.add_adapter(name, folder)
                except BaseException:
                    self.owners = {k: v for k, v in self.owners.items() if k != name}
                    raise
                self.versions[name] = version
                if parent:
                    self.parents[name] = parent
                log.info("serving fine-tune %s from %s", name, folder)
            self.loaded[name] = time.monotonic()
            self.loaded.move_to_end(name)
        return True

    def forget(self, name: str) -> None:
        """Stop serving ``name`` here (deleted, or evicted)."""
        with self.lock:
            if name not in self.owners:
                return
            self.owners = {k: v for k, v in self.owners.items() if k != name}
            self.loaded.pop(name, None)
            self.versions.pop(name, None)
        self.engine.remove_adapter(name)

    def preload(self, since: int) -> int:
        """Load the fine-tunes whose jobs succeeded at or after ``since`` (a Unix time), newest first, up to the
        capacity, so their first request does not wait for the load; returns where the next look starts."""
        newest = since
        for job in self.store.fine_tunes_since(since, self.capacity):
            newest = max(newest, (job["finished_at"] or since) + 1)  # a later one of the same second: at first use
            self.resolve(job["fine_tuned_model"], job["owner"])
        return newest

    def _make_room(self) -> None:
        """Evict the least recently asked fine-tunes past the capacity, sparing any asked within ``in_use_s``."""
        now = time.monotonic()
        idle = [n for n, at in self.loaded.items() if now - at > self.in_use_s]
        while len(self.loaded) >= self.capacity and idle:
            name = idle.pop(0)
            log.info("evicting fine-tune %s (least recently used of %d loaded)", name, len(self.loaded))
            self.forget(name)

    def _find(self, name: str) -> tuple[str | None, str, str | None] | None:
        """(owner, folder, parent) of the fine-tune or checkpoint ``name`` when it is kept; None otherwise."""
        if name.startswith("ft:"):
            job = self.store.job_by_model(name)
            if job is not None and job["status"] == "succeeded" and not job["model_deleted"]:
                folder = _folder(job)
                return None if folder is None else (job["owner"], folder, job.get("parent_model"))
            ckpt = self.store.checkpoint_by_model(name)
            if ckpt is not None and Path(ckpt["path"]).is_dir():
                return ckpt["owner"], ckpt["path"], None
        if name.startswith(SCHEME):  # a Tinker sampler checkpoint (tunesmith.serve.tinker)
            ckpt = self.store.sampler_checkpoint_by_model(name)
            if ckpt is not None and Path(ckpt["folder"]).is_dir():
                return ckpt["owner"], ckpt["folder"], None
        return None


def weights_version(name: str, folder: str) -> tuple | None:
    """A Tinker checkpoint's weights file's identity (its path may be saved again with other weights: each save is
    written aside and renamed in place, a new file); None for a fine-tune, whose weights never change."""
    if not name.startswith(SCHEME):
        return None
    try:
        stat = (Path(folder) / "adapter_model.safetensors").stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _folder(job: dict) -> str | None:
    """A succeeded job's adapter (or head) folder, when it is still on disk."""
    if not job.get("run_dir"):
        return None
    folder = Path(job["run_dir"]) / "train" / "adapter"
    return str(folder) if folder.is_dir() else None
