"""The Tinker API's checkpoints: a run's weights saved as a training state (``tinker://<run>/weights/<name>``: the
adapter and its AdamW state) or sampler weights (``tinker://<run>/sampler_weights/<name>``: the adapter, sampled from
and served as a model of its key on the OpenAI API), loaded into a run, listed, expired and deleted.

Every folder is built from server-made parts only (a run id of the server's shape, a kind, a checked name) under the
key's own folder, ``<data-dir>/tinker/keys/<digest of its owner id>``, and checked, resolved, to lie inside it before
anything is written or removed: a refusal, not a repair. A save is written aside and put in place with its row, so a
failing save leaves neither files nor a row."""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path

from tunesmith.serve.errors import APIError
from tunesmith.serve.store import new_id
from tunesmith.serve.tinker.losses import TrainingError
from tunesmith.serve.tinker.store import NAME, RUN_ID, checkpoint_path, parse_path, run_name

log = logging.getLogger("tunesmith.serve")
NAME_CHARS = 128  # a checkpoint's name
AUTOSAVE = "autosave"  # the training state the server saves on its own (tunesmith.serve.tinker.commands)


def check_name(name: str) -> str:
    """A checkpoint name: ASCII letters, digits and ``-_.``, at most :data:`NAME_CHARS` (it is a folder and a path
    part)."""
    if not NAME.fullmatch(name):
        raise TrainingError(f"path: checkpoint name {name[:40]!r} must be 1..{NAME_CHARS} ASCII letters, digits, '-', "
                            "'_' or '.' (not starting with '.')")
    return name


def key_folder(owner: str | None) -> str:
    """The folder name of a key's Tinker files: a digest of its owner id (``open``: a server without keys)."""
    return "open" if owner is None else hashlib.sha256(owner.encode()).hexdigest()[:32]


def inside(path: Path, folder: Path) -> Path:
    """``path`` resolved, when it lies inside ``folder``; a refusal (never a repair) otherwise."""
    resolved, root = path.resolve(), folder.resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise APIError(400, "That path lies outside this key's Tinker folder.", code="invalid_value")
    return resolved


def iso(at: int | None) -> str | None:
    """A Unix time as the SDK's ISO 8601 datetime (None stays None)."""
    import datetime

    return None if at is None else datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat()


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


class Checkpoints:
    """The checkpoint operations of :class:`tunesmith.serve.tinker.service.Tinker` (its ``root``, ``store``,
    ``trainer``, ``quotas`` and held runs)."""

    # --- checkpoints -------------------------------------------------------------------------------------------

    def key_root(self, owner) -> Path:
        """The folder of a key's checkpoints: ``<data>/tinker/keys/<digest of its owner id>``."""
        return self.root / "keys" / key_folder(owner)

    def _folder(self, owner, run_id: str, kind: str, name: str) -> Path:
        """A checkpoint's folder, built from server-made parts only (a run id of :data:`RUN_ID`, a kind, a checked
        name) and checked to lie inside the key's folder."""
        if not RUN_ID.fullmatch(run_id) or kind not in ("weights", "sampler_weights"):
            raise TrainingError(f"model_id {run_id[:64]!r} is not a training run of this server")
        root = self.key_root(owner)
        return inside(root / run_id.replace(":", "_") / kind / check_name(name), root)

    def remove(self, owner, folder: str) -> None:
        """A checkpoint's folder removed, when it lies inside its key's folder (a row that names any other place is
        left alone, and said in the log)."""
        try:
            path = inside(Path(folder), self.key_root(owner))
        except APIError:
            log.warning("a Tinker checkpoint's folder %s lies outside its key's folder: not removed", folder)
            return
        shutil.rmtree(path, ignore_errors=True)

    def _record(self, owner, run_id: str, path: str, folder: Path, metadata, ttl_s: int | None) -> None:
        """The checkpoint's row, written only while this replica still holds the run (fenced by its claim)."""
        self.claims[run_id].write(self.store.add_checkpoint, path, owner, str(folder), folder_size(folder), metadata,
                                  ttl_s)

    def sweep(self) -> int:
        """Checkpoints past their TTL: their folders removed, then their rows; how many."""
        gone = self.store.expired()
        for ckpt in gone:
            self.remove(ckpt["owner"], ckpt["folder"])
            self.store.forget_checkpoint(ckpt["path"])
        return len(gone)

    def save(self, owner, run_id: str, name: str | None, kind: str, overwrite: bool, metadata,
             ttl_s: int | None = None, own: bool = False) -> dict:
        """The run's weights as a checkpoint: ``weights`` (adapter and optimizer: a training state) or
        ``sampler_weights`` (the adapter: sampled from, and a model of the key on the OpenAI API); gone after
        ``ttl_s`` seconds when given (the SDK's ``ttl_seconds``). ``own``: the server's own save (the only one that
        may name a state :data:`AUTOSAVE`)."""
        self.run_of(owner, run_id)
        if name == AUTOSAVE and kind == "weights" and not own:
            raise TrainingError(f"path: the state name {AUTOSAVE!r} is the server's own (it saves each run's state "
                                "there on its own); choose another name")
        if ttl_s is not None and not 3600 <= ttl_s <= 10 * 365 * 86400:
            raise TrainingError(f"ttl_seconds must be 3600 (an hour) to 315360000 (ten years), got {ttl_s}")
        self.sweep()
        name = check_name(name or f"{time.strftime('%Y%m%d-%H%M%S')}-{new_id('w')[-8:]}")
        path = checkpoint_path(run_id, kind, name)
        old = self.store.checkpoint(path, owner)
        if not overwrite and old is not None:
            raise TrainingError(f"checkpoint {path} exists; choose another name (or overwrite=true for a state)")
        self.check_checkpoint_quota(owner, run_id, kind, old)
        folder = self._folder(owner, run_id, kind, name)
        staging = folder.with_name(f".{name}.{new_id('tmp')[-8:]}")
        staging.mkdir(parents=True)
        try:  # written aside, then put in place and recorded; a failure leaves neither files nor a row
            (self.trainer.save_state if kind == "weights" else self.trainer.save_adapter)(run_id, staging)
            previous = folder.with_name(f".{name}.{new_id('old')[-8:]}")
            if folder.exists():
                folder.replace(previous)
            staging.replace(folder)
            try:
                self._record(owner, run_id, path, folder, metadata, ttl_s)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                if previous.exists():
                    previous.replace(folder)
                raise
            shutil.rmtree(previous, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return {"path": path}

    def check_checkpoint_quota(self, owner, run_id: str, kind: str, replaced: dict | None) -> None:
        """A TrainingError when one more checkpoint of the run (its size estimated from the run's adapter, with its
        optimizer for a training state) would take the key past its checkpoints' count or bytes."""
        kept = self.store.count_checkpoints(owner) - (replaced is not None)
        if self.quotas.tinker_checkpoints is not None and kept >= self.quotas.tinker_checkpoints:
            raise TrainingError(f"this key keeps {kept} checkpoints (at most {self.quotas.tinker_checkpoints}, --quota "
                                "tinker_checkpoints); delete some (RestClient.delete_checkpoint)")
        limit = self.quotas.tinker_checkpoint_bytes
        if limit is None:
            return
        used = self.store.checkpoint_bytes(owner) - (replaced["size_bytes"] if replaced else 0)
        size = self.trainer.checkpoint_bytes(run_id, with_optimizer=kind == "weights")
        if used + size > limit:
            raise TrainingError(f"this checkpoint takes about {size / 2**20:,.0f} MiB beside the {used / 2**20:,.0f} MiB "
                                f"of checkpoints this key keeps; at most {limit / 2**30:.1f} GiB a key (--quota "
                                "tinker_checkpoint_bytes); delete some (RestClient.delete_checkpoint)")

    def load(self, owner, run_id: str, path: str, optimizer: bool) -> dict:
        """A saved state (or sampler weights, without the optimizer) loaded into the run: also where a run taken
        over from its last save resumes (:mod:`tunesmith.serve.tinker.commands`)."""
        self.run_of(owner, run_id, loads=True)
        ckpt = self.checkpoint(owner, path)
        if optimizer and ckpt["kind"] != "training":
            raise TrainingError(f"{path} holds sampler weights only; load it without the optimizer")
        self.trainer.load_state(run_id, Path(ckpt["folder"]), optimizer)
        self.resume.pop(run_id, None)
        self.autosave(owner, run_id, force=True)
        return {"type": "load_weights", "path": path, "model_id": run_id}

    def create_from(self, owner, session_id: str, seq: int, path: str, optimizer: bool, base_model: str | None,
                    metadata: dict | None) -> dict:
        """A new run made from a saved checkpoint (the SDK's ``create_training_client_from_state``)."""
        self.own_session(owner, session_id)
        ckpt = self.checkpoint(owner, path)
        source = self.store.get_run(ckpt["run_id"], owner)
        self.create_model(owner, session_id, seq, base_model or source["base_model"], source["lora"], metadata)
        return self.load(owner, run_name(session_id, seq), path, optimizer)

    def checkpoint(self, owner, path: str) -> dict:
        if parse_path(path) is None:
            raise TrainingError(f"{path[:200]!r} is not a checkpoint path of this server (tinker://<run>/weights/<name> "
                                "or tinker://<run>/sampler_weights/<name>)")
        ckpt = self.store.checkpoint(path, owner)
        if ckpt is None or not Path(ckpt["folder"]).is_dir():
            raise APIError(404, f"No checkpoint {path} for this key.", code="not_found")
        return ckpt

    def sampler_checkpoint(self, owner, path: str) -> dict:
        """A checkpoint of ``owner``'s that samples: saved for the sampler (what the inference engine serves)."""
        ckpt = self.checkpoint(owner, path)
        if ckpt["kind"] != "sampler":
            raise TrainingError(f"{path} is a training state; sample from a checkpoint saved for the sampler "
                                "(save_weights_for_sampler, or save_weights_and_get_sampling_client)")
        return ckpt

    def delete_checkpoint(self, owner, path: str) -> dict:
        """A checkpoint's row, then its folder (a sampler checkpoint stops being a model of the key)."""
        ckpt = self.checkpoint(owner, path)
        self.store.delete_checkpoint(path, owner)
        self.remove(owner, ckpt["folder"])
        return {"deleted": True, "tinker_path": path}

    def run_object(self, run: dict) -> dict:
        ckpts = self.store.checkpoints(run["id"], run["owner"])
        last = {kind: next((c for c in reversed(ckpts) if c["kind"] == kind), None) for kind in ("training", "sampler")}
        return {"training_run_id": run["id"], "base_model": run["base_model"], "model_owner": run["owner"] or "",
                "is_lora": True, "corrupted": False, "lora_rank": run["lora"]["rank"],
                "last_request_time": iso(run["last_request_at"]),
                "last_checkpoint": last["training"] and self.checkpoint_object(last["training"]),
                "last_sampler_checkpoint": last["sampler"] and self.checkpoint_object(last["sampler"]),
                "user_metadata": run["metadata"]}

    def checkpoint_object(self, ckpt: dict) -> dict:
        return {"checkpoint_id": "/".join(parse_path(ckpt["path"])[1:]), "checkpoint_type": ckpt["kind"],
                "time": iso(ckpt["created_at"]), "tinker_path": ckpt["path"], "size_bytes": ckpt["size_bytes"],
                "public": False, "user_metadata": ckpt["metadata"], "expires_at": iso(ckpt["expires_at"])}
