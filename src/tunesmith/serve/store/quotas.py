"""Per-key quotas: what one API key may keep on the server, checked before a route creates an object; the metadata
rule every object follows; the sweep that deletes what has expired.

Every limit lives in :class:`Quotas` (``tunesmith serve --quota NAME=VALUE`` changes one). A route calls its check
before it creates anything; a key at its limit gets a 429 in OpenAI's shape (type ``insufficient_quota``, as OpenAI
answers an exhausted quota, code ``quota_exceeded``) naming the quota, the key's use and how to make room, with
``x-should-retry: false``: waiting frees nothing a key keeps (the official clients would otherwise retry a 429),
deleting does. Use is counted in SQL (``COUNT(*)``, ``SUM(bytes)``), never by loading rows.

A quota holds under concurrency, over every replica: the count and the object's insert run in one transaction that
first takes the key's quota lock (:func:`room`: a PostgreSQL advisory lock held to the transaction's end; SQLite's
write lock already serializes), so of creations racing for a key's last place one gets it, for files, uploads,
fine-tuning jobs, batches, evals and eval runs. A route may also check early, outside the transaction, to refuse
before costly work (reading a file, checking a job's data). Stored completions and responses are checked before the
answer is generated and kept once it is paid for: requests racing for the last place may each keep theirs, at most
the key's requests in flight past the quota.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from fastapi import Request

from tunesmith.errors import ConfigError
from tunesmith.serve.errors import APIError
from tunesmith.serve.store.database import log_failure

MB, GB = 1024**2, 1024**3
DAY = 24 * 3600
METADATA_PAIRS, METADATA_KEY, METADATA_VALUE = 16, 64, 512  # OpenAI's metadata rule
ACTIVE_BATCH = ("validating", "in_progress", "finalizing", "cancelling")
ACTIVE_JOB = ("validating_files", "queued", "running", "paused")  # a fine-tuning job not finished
LIVE_UPLOAD = ("pending", "completing")  # an upload still holding (or about to turn into) a file


@dataclass(frozen=True)
class Quotas:
    """What one API key may keep at once (None: no limit). OpenAI's published limits where it publishes one."""

    files: int | None = 10_000  # files kept (uploads still pending count as files to come)
    file_bytes: int | None = 10 * GB  # bytes of files kept plus bytes declared by pending uploads
    batch_file_bytes: int | None = 200 * MB  # one batch input file, as at OpenAI
    batch_requests: int | None = 50_000  # requests in one batch, as at OpenAI
    batches: int | None = 10  # batches not finished (validating, in progress, finalizing, cancelling)
    # fine-tuning jobs not finished (validating files, queued, running, paused). A server trains a key's jobs a few at
    # a time (--jobs-per-key) and each takes minutes to hours, so a hundred is more than a day's queue for any key,
    # while it bounds the rows of one key that the fair queue (its positions, its claims) reads
    jobs: int | None = 100
    pending_uploads: int | None = 20  # uploads neither completed, cancelled nor expired
    upload_expiry_s: int = 3600  # an upload not completed within it expires, its parts deleted (as at OpenAI)
    batch_file_expiry_s: int | None = 30 * DAY  # a purpose "batch" file's life without expires_after (as at OpenAI)
    stored_completions: int | None = 100_000  # chat completions kept with store: true
    responses: int | None = 100_000  # Responses kept (store defaults to true)
    evals: int | None = 1_000
    eval_runs: int | None = 1_000  # runs kept, over all of a key's evals
    # Tinker API (tunesmith.serve.tinker): training runs a key holds in a replica's memory at once (each a LoRA and
    # its optimizer on the resident base), and checkpoints it keeps on the data folder
    tinker_runs: int | None = 8
    tinker_checkpoints: int | None = 1_000
    # the memory a key's runs and its largest call may take (each run's adapter, gradients and AdamW moments; a call's
    # activations): a quarter of the machine's memory, so that four keys at their limit still fit
    tinker_memory_bytes: int | None = field(default_factory=lambda: machine_memory() // 4)
    tinker_checkpoint_bytes: int | None = 10 * GB  # bytes of the checkpoints a key keeps (as file_bytes)
    sweep_s: float = 60.0  # how often expired uploads, their parts and expired files are deleted

    @classmethod
    def parse(cls, items: list[str], base: Quotas | None = None) -> Quotas:
        """``NAME=VALUE`` pairs over ``base`` (the defaults): a count, bytes with a K/M/G/T suffix (``20G``),
        seconds, or ``off`` for no limit; a ConfigError naming the pair otherwise."""
        known = {f.name: f for f in fields(cls)}
        changes = {}
        for item in items:
            name, sep, value = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in known:
                raise ConfigError(f"--quota expects NAME=VALUE with NAME one of {', '.join(known)}; got '{item}'")
            changes[name] = _value(name, value.strip(), optional="None" in str(known[name].type))
        return replace(base or cls(), **changes)


def machine_memory() -> int:
    """This machine's memory in bytes (MemTotal; 16 GB where it cannot be read)."""
    from tunesmith.machine.memory import meminfo

    return meminfo("MemTotal") or 16 * GB


def _value(name: str, text: str, optional: bool) -> int | float | None:
    if text.lower() in ("off", "none", "unlimited"):
        if not optional:
            raise ConfigError(f"--quota {name}: this one cannot be off; give a number")
        return None
    units = {"k": 1024, "m": MB, "g": GB, "t": 1024 * GB} if name.endswith("_bytes") else {}
    scale = units.get(text[-1:].lower(), 1)
    number = text[:-1] if scale != 1 else text
    try:
        value = float(number) * scale if name == "sweep_s" else int(number) * scale
    except ValueError:
        raise ConfigError(f"--quota {name}={text}: a number (bytes may end in K, M, G or T), or 'off'") from None
    if value <= 0:
        raise ConfigError(f"--quota {name}={text}: must be above 0 (or 'off')")
    return value


def quotas_of(request: Request) -> Quotas:
    return getattr(request.app.state.settings, "quotas", None) or Quotas()


# --- refusals --------------------------------------------------------------------------------------


def _size(n: int) -> str:
    for unit, scale in (("GB", GB), ("MB", MB), ("KB", 1024)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,} bytes"


def exceeded(name: str, limit: int, used: int, what: str, free: str, size: bool = False) -> APIError:
    """The 429 of a key at quota ``name``: its use, the limit and how to make room."""
    show = _size if size else (lambda n: f"{n:,}")
    return APIError(429, f"Quota {name} reached for this API key: {show(used)} of {show(limit)} {what}. {free} "
                    f"(the server's operator may raise it: tunesmith serve --quota {name}=N).",
                    type_="insufficient_quota", code="quota_exceeded", headers={"x-should-retry": "false"})


def _in(statuses: tuple[str, ...]) -> str:
    """``('a', 'b')``: SQL's ``IN`` list of these fixed statuses (ours, never a caller's)."""
    return "(" + ", ".join(f"'{s}'" for s in statuses) + ")"


def _one(request: Request, sql: str, *args) -> tuple:
    return request.app.state.store.db.execute(sql, args).fetchone()


def _check_count(request: Request, name: str, limit: int | None, sql: str, args: tuple, what: str, free: str) -> None:
    """Room for one more under quota ``name``: ``sql`` counts the key's use (a 429 when it is at ``limit``)."""
    if limit is None:
        return
    used = _one(request, sql, *args)[0]
    if used + 1 > limit:
        raise exceeded(name, limit, used, what, free)


@contextlib.contextmanager
def room(store, key):
    """One transaction that first takes ``key``'s quota lock: a check made inside it and the insert that follows
    commit together, so that of creations racing for the key's last place (on any replica) one gets it. The store's
    own lock is held for the whole transaction, never taken again in the middle of it: a thread holding the lock can
    then never wait for a pooled connection that a transaction waiting for the lock holds."""
    with store.lock, store.db.transaction():
        store.db.serialize(f"quota:{key}")
        yield


# --- checks before a route creates an object -----------------------------------------------------------------


def check_file(request: Request, key, new_bytes: int, *, pending_upload: bool = False) -> None:
    """Room for one more file of ``new_bytes`` (or, ``pending_upload``, an upload declaring them): files and
    pending uploads together within ``files`` and ``file_bytes``."""
    q = quotas_of(request)
    live = f"FROM uploads WHERE owner IS ? AND status IN {_in(LIVE_UPLOAD)} AND expires_at >= ?"
    files, stored = _one(request, "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM files WHERE owner IS ?", key)
    uploads, declared = _one(request, f"SELECT COUNT(*), COALESCE(SUM(bytes), 0) {live}", key, int(time.time()))
    free = "Delete files you no longer need (files.delete) or cancel pending uploads (uploads.cancel)."
    if q.files is not None and files + uploads + 1 > q.files:
        raise exceeded("files", q.files, files + uploads, "used by files and pending uploads", free)
    if q.file_bytes is not None and stored + declared + new_bytes > q.file_bytes:
        raise exceeded("file_bytes", q.file_bytes, stored + declared, f"used by files and pending uploads, and this "
                       f"one needs {_size(new_bytes)}", free, size=True)
    if pending_upload:
        _check_count(request, "pending_uploads", q.pending_uploads, f"SELECT COUNT(*) {live}", (key, int(time.time())),
                     "uploads pending", "Complete or cancel one (uploads.complete, uploads.cancel); an "
                     "upload left alone expires an hour after it was created")


def check_batch_file_size(request: Request, size: int) -> None:
    """A batch input file within ``batch_file_bytes`` (400 on ``file``)."""
    limit = quotas_of(request).batch_file_bytes
    if limit is not None and size > limit:
        raise APIError(400, f"file: a batch input file holds at most {_size(limit)}; this one is {_size(size)}. "
                       "Split the requests over several batches", param="file", code="file_too_large")


def check_batch_create(request: Request, key, metadata, requests: int | None = None) -> None:
    """Before a batch is created: its ``metadata`` (OpenAI's rule), its number of ``requests`` within
    ``batch_requests`` (400 on ``input_file_id``), and room among the key's unfinished batches (``batches``)."""
    check_metadata(metadata, "metadata")
    q = quotas_of(request)
    if requests is not None and q.batch_requests is not None and requests > q.batch_requests:
        raise APIError(400, f"input_file_id: the file holds {requests:,} requests; a batch holds at most "
                       f"{q.batch_requests:,}. Split them over several files", param="input_file_id",
                       code="too_many_requests")
    _check_count(request, "batches", q.batches, f"SELECT COUNT(*) FROM batches WHERE owner IS ? AND status IN "
                 f"{_in(ACTIVE_BATCH)}", (key,), "batches unfinished", "Wait for one to end or cancel one (batches.cancel)")


def check_job(request: Request, key) -> None:
    _check_count(request, "jobs", quotas_of(request).jobs, f"SELECT COUNT(*) FROM jobs WHERE owner IS ? AND status IN "
                 f"{_in(ACTIVE_JOB)}", (key,), "fine-tuning jobs unfinished (validating, queued, running or paused)",
                 "Wait for one to end or cancel one (fine_tuning.jobs.cancel)")


def check_stored_completion(request: Request, key) -> None:
    _check_count(request, "stored_completions", quotas_of(request).stored_completions,
                 "SELECT COUNT(*) FROM stored_completions WHERE owner IS ?", (key,), "stored completions kept",
                 "Delete some (chat.completions.delete), or send store: false")


def check_response(request: Request, key) -> None:
    _check_count(request, "responses", quotas_of(request).responses, "SELECT COUNT(*) FROM responses WHERE owner IS ?",
                 (key,), "responses kept", "Delete some (responses.delete), or send store: false")


def check_eval(request: Request, key) -> None:
    _check_count(request, "evals", quotas_of(request).evals, "SELECT COUNT(*) FROM evals WHERE owner IS ?", (key,),
                 "evals kept", "Delete evals you no longer need (evals.delete)")


def check_eval_run(request: Request, key) -> None:
    _check_count(request, "eval_runs", quotas_of(request).eval_runs, "SELECT COUNT(*) FROM eval_runs WHERE owner IS ?",
                 (key,), "eval runs kept", "Delete runs you no longer need (evals.runs.delete)")


# --- metadata ----------------------------------------------------------------------------------------


def check_metadata(value, param: str = "metadata") -> dict[str, str]:
    """OpenAI's metadata rule: null, or at most 16 pairs of strings, keys up to 64 characters, values up to 512;
    a 400 on ``param`` naming what breaks it. Returns the pairs ({} for null)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad_metadata(param, f"an object of string pairs, not {type(value).__name__}")
    if len(value) > METADATA_PAIRS:
        raise _bad_metadata(param, f"at most {METADATA_PAIRS} pairs; it has {len(value)}")
    for k, v in value.items():
        if not isinstance(k, str) or len(k) > METADATA_KEY:
            raise _bad_metadata(param, f"keys are strings of at most {METADATA_KEY} characters; '{str(k)[:70]}' has "
                                f"{len(str(k))}")
        if not isinstance(v, str):
            raise _bad_metadata(param, f"values are strings; '{k}' is {type(v).__name__}")
        if len(v) > METADATA_VALUE:
            raise _bad_metadata(param, f"values are at most {METADATA_VALUE} characters; '{k}' has {len(v)}")
    return value


def _bad_metadata(param: str, why: str) -> APIError:
    return APIError(400, f"{param}: {why} (metadata is up to {METADATA_PAIRS} pairs of strings, keys up to "
                    f"{METADATA_KEY} characters, values up to {METADATA_VALUE})", param=param, code="invalid_metadata")


# --- the sweep -----------------------------------------------------------------------------------------


def sweep(store, now: float | None = None, quotas: Quotas | None = None) -> dict[str, int]:
    """Delete what has expired: pending uploads past ``expires_at`` (marked expired, their parts' rows and bytes
    deleted), parts of uploads no longer pending (one added while its upload was cancelled), part files no row
    names (a crash between writing and recording), and files past their ``expires_at`` that no unfinished job or
    batch reads. Returns what it did, by kind."""
    now = int(now if now is not None else time.time())
    done = {"uploads_expired": _expire_uploads(store, now), "parts": _drop_orphan_parts(store),
            "stray_part_files": _drop_stray_part_files(store, now - (quotas or Quotas()).upload_expiry_s),
            "files": _drop_expired_files(store, now)}
    return {k: v for k, v in done.items() if v}


def _expire_uploads(store, now: int) -> int:
    """Pending uploads past their time, and uploads left ``completing`` an hour past it (a server stopped
    mid-complete), marked expired."""
    with store.lock:
        return store.db.execute("UPDATE uploads SET status = 'expired' WHERE (status = 'pending' AND expires_at < ?) "
                                "OR (status = 'completing' AND expires_at < ?)", (now, now - 3600)).rowcount


def _drop_orphan_parts(store) -> int:
    with store.lock:
        rows = store.db.execute("SELECT id, storage FROM upload_parts WHERE upload_id NOT IN (SELECT id FROM uploads "
                                f"WHERE status IN {_in(LIVE_UPLOAD)})").fetchall()
        store.db.executemany("DELETE FROM upload_parts WHERE id = ?", [(r["id"],) for r in rows])
    for r in rows:
        Path(r["storage"]).unlink(missing_ok=True)
    return len(rows)


def _drop_stray_part_files(store, older_than: float) -> int:
    """Part files no row names, last written before ``older_than`` (a part being written now is not one)."""
    named = {r[0] for r in store.db.execute("SELECT storage FROM upload_parts")}
    dropped = 0
    with os.scandir(store.root / "files") as entries:
        for entry in entries:
            if entry.name.startswith("part-") and entry.path not in named and entry.stat().st_mtime < older_than:
                Path(entry.path).unlink(missing_ok=True)
                dropped += 1
    return dropped


def _drop_expired_files(store, now: int) -> int:
    """Files past ``expires_at``, except those an unfinished job or batch still reads (they go once it ends)."""
    with store.lock:
        rows = store.db.execute(
            "SELECT id, storage FROM files f WHERE expires_at IS NOT NULL AND expires_at < ? AND NOT EXISTS (SELECT 1 "
            f"FROM jobs j WHERE j.status IN {_in(ACTIVE_JOB)} AND f.id IN "
            f"(j.training_file, j.validation_file)) AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.status IN {_in(ACTIVE_BATCH)} "
            "AND b.input_file_id = f.id)", (now,)).fetchall()
        store.db.executemany("DELETE FROM files WHERE id = ?", [(r["id"],) for r in rows])
    for r in rows:
        Path(r["storage"]).unlink(missing_ok=True)
    return len(rows)


async def sweep_forever(app) -> None:
    """:func:`sweep` every ``sweep_s`` seconds in a thread, from the app's start to its end."""
    quotas = getattr(app.state.settings, "quotas", None) or Quotas()
    log = logging.getLogger("tunesmith.serve")
    while True:
        try:
            swept = await asyncio.to_thread(sweep, app.state.store, None, quotas)
            if swept:
                log.info("swept expired objects: %s", swept)
        except Exception as exc:  # noqa: BLE001 - the next sweep tries again; the server goes on
            log_failure(log, "sweeping expired uploads and files failed", exc)
        await asyncio.sleep(quotas.sweep_s)


def start_sweeper(app) -> asyncio.Task:
    """The sweep as a task of the app's lifespan (cancel it at the end)."""
    return asyncio.ensure_future(sweep_forever(app))
