"""OpenAI-compatible files and fine-tuning jobs routes over the store.

Every file and job belongs to the API key that created it; another key gets a 404, exactly as
for an id that does not exist. Ids are looked up, never used as paths. The store's work (and a file's bytes read or
written) runs in the store lane, never on the event loop (:mod:`tunesmith.serve.api.store_lane`).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunesmith.serve.api.auth import Key
from tunesmith.serve.api.json_body import OffLoopJSON
from tunesmith.serve.api.objects import checkpoint_object, event_object, file_object, job_object, page
from tunesmith.serve.api.store_lane import in_store_lane, stored
from tunesmith.serve.errors import APIError, found
from tunesmith.serve.jobs import reinforcement
from tunesmith.serve.jobs.reinforcement import ReinforcementMethod
from tunesmith.serve.jobs.store import JobStore
from tunesmith.serve.store import quotas
from tunesmith.serve.store.values import check_name, check_seed

router = APIRouter(prefix="/v1", route_class=OffLoopJSON)


def _store(request: Request) -> JobStore:  # the server's store as the jobs room sees it
    return JobStore(request.app.state.store)


def _job_object(request: Request, job: dict) -> dict:
    """The job object with its current place in the fair queue."""
    return job_object(job, _store(request).queue_positions([job["id"]]).get(job["id"]))


# --- files ---------------------------------------------------------------------------------


EXPIRES_S = (3600, 30 * 24 * 3600)  # OpenAI's bounds on a file's expires_after.seconds


FILENAME_CHARS = 512  # a file's name, as an upload's (tunesmith.serve.jobs.uploads)
COPY_BYTES = 1 << 20  # a received file copied, and a file's content sent, this much at a time


@router.post("/files")
async def create_file(request: Request, key: Key, file: Annotated[UploadFile, File()],
                      purpose: Annotated[str, Form()],
                      anchor: Annotated[str | None, Form(alias="expires_after[anchor]")] = None,
                      seconds: Annotated[str | None, Form(alias="expires_after[seconds]")] = None):
    """A file kept for the key. Its fields are checked first (400 naming the field), before any byte is written to
    the store's folder; the bytes Starlette spooled (to a temporary file past 1 MB, never held in memory) are then
    copied there in the files lane, checked as a file of their purpose, and kept in one transaction with the count
    of the key's quota: a refusal leaves nothing on disk."""
    settings = request.app.state.settings
    if purpose not in ("fine-tune", "evals", "batch"):
        raise APIError(400, f"purpose '{purpose}' is not supported; use 'fine-tune', 'evals' or 'batch'",
                       param="purpose")
    expires_s = file_expiry(request, purpose, anchor, seconds)
    filename = check_name(Path(file.filename or "upload.jsonl").name, "file.filename", FILENAME_CHARS)
    if file.size is not None and file.size > settings.max_upload_mb * 1024 * 1024:
        raise APIError(413, f"file is larger than the {settings.max_upload_mb} MB limit", param="file",
                       code="file_too_large")
    if purpose == "batch":
        quotas.check_batch_file_size(request, file.size or 0)
    await stored(request, key, quotas.check_file, request, key, file.size or 0)
    incoming = await request.app.state.lanes.files.run(key, received, _store(request), file.file)
    try:
        await checked(request, key, purpose, incoming, "file")
        made = await stored(request, key, kept_file, request, key, filename, purpose, incoming, expires_s)
    finally:
        incoming.unlink(missing_ok=True)  # kept: moved into the store; refused: not kept
    return file_object(made)


def received(store, spooled) -> Path:
    """The spooled upload copied into the store's folder as a part file (one a crash leaves is swept), a block at a
    time."""
    incoming = store.root / "files" / f"part-{secrets.token_hex(16)}.bin"
    spooled.seek(0)
    try:
        with incoming.open("wb") as out:
            shutil.copyfileobj(spooled, out, COPY_BYTES)
    except BaseException:
        incoming.unlink(missing_ok=True)
        raise
    return incoming


def kept_file(request: Request, key, filename: str, purpose: str, path: Path, expires_s: int | None,
              counted: bool = True) -> dict:
    """The checked file at ``path`` kept for ``key`` with its ``expires_at``: the key's quota counted and the file
    recorded in one transaction under the key's quota lock (of uploads racing for its last place, on any replica,
    one gets it). ``counted=False``: its place was taken before (an upload's, at its creation)."""
    store = _store(request)
    with quotas.room(store, key):
        if counted:
            quotas.check_file(request, key, path.stat().st_size)
        return store.adopt_file(key, filename, purpose, path, expires_s)


def file_expiry(request: Request, purpose: str, anchor: str | None, seconds) -> int | None:
    """A new file's life in seconds: its ``expires_after`` (anchor ``created_at``, 1 hour to 30 days, as at OpenAI),
    else 30 days for a batch file (``--quota batch_file_expiry_s``) and none for any other; a 400 naming the field
    otherwise."""
    if anchor is None and seconds is None:
        return quotas.quotas_of(request).batch_file_expiry_s if purpose == "batch" else None
    if anchor != "created_at":
        raise APIError(400, f"expires_after.anchor must be 'created_at', got {anchor!r}", param="expires_after.anchor")
    try:
        seconds = int(seconds)
    except (TypeError, ValueError):
        seconds = None
    if seconds is None or not EXPIRES_S[0] <= seconds <= EXPIRES_S[1]:
        raise APIError(400, f"expires_after.seconds must be a whole number from {EXPIRES_S[0]} (1 hour) to "
                       f"{EXPIRES_S[1]:,} (30 days)", param="expires_after.seconds")
    return seconds


def expire_file(store, made: dict, expires_s: int | None) -> dict:
    """``made`` with its ``expires_at`` set ``expires_s`` after its creation (the sweep deletes it then)."""
    if expires_s is None:
        return made
    made["expires_at"] = made["created_at"] + expires_s
    with store.lock:
        store.db.execute("UPDATE files SET expires_at = ? WHERE id = ?", (made["expires_at"], made["id"]))
    return made


async def checked(request: Request, key, purpose: str, path: Path, param: str) -> None:
    """The checks a file of ``purpose`` gets, read from ``path`` (in the files lane as ``key``'s work: a large file must
    not stall other requests); a 400 on ``param`` naming each problem and its lines."""
    from functools import partial

    from tunesmith.serve.batches.lines import check_batch_file

    most = quotas.quotas_of(request).batch_requests
    check = {"fine-tune": check_upload, "evals": check_eval_upload, "batch": partial(check_batch_file, max_lines=most)}[purpose]
    problems = await request.app.state.lanes.files.run(key, check, path)
    if problems:
        what = {"fine-tune": "fine-tuning", "evals": "evals", "batch": "batch"}[purpose]
        raise APIError(400, f"Invalid {what} file: " + "; ".join(problems), param=param, code="invalid_file_format")


def check_upload(path: Path) -> list[str]:
    """The data stage's OpenAI checks, run on the upload; returns error kinds with counts and lines.
    A file the checks cannot read is one problem, never a server error."""
    from tunesmith.data.formats.validate import validate_upload

    try:
        return validate_upload(path)
    except Exception:  # noqa: BLE001 - malformed input is the client's 400; the detail goes to the log
        logging.getLogger("tunesmith.serve").exception("upload validation failed")
        return ["unreadable_file: the file is not JSON lines in OpenAI's chat or preference format"]


def check_eval_upload(path: Path, most: int = 5) -> list[str]:
    """An evals file is UTF-8 JSON lines of ``{"item": {...}, "sample": {...}}`` (sample optional), nested within
    the batch files' depth, read a line at a time; the first ``most`` bad lines are named."""
    from tunesmith.data.formats.json_lines import NotUTF8, json_line, utf8_lines

    problems = []
    try:
        for n, line in utf8_lines(path):
            if not line.strip():
                continue
            row, why = json_line(line)
            if why:
                problems.append(f"line {n}: {why}")
            elif not isinstance(row, dict) or not isinstance(row.get("item"), dict):
                problems.append(f"line {n}: not a JSON object with an \"item\" object")
            if len(problems) == most:
                break
    except NotUTF8 as bad:
        problems.append(str(bad))
    return problems


@router.get("/files")
@in_store_lane
def list_files(request: Request, key: Key, purpose: str | None = None, after: str | None = None,
               limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000, order: Literal["asc", "desc"] = "desc"):
    files, more = _store(request).list_files(key, purpose, after, limit, order)
    return page([file_object(f) for f in files], more)


def _file(request: Request, key, file_id: str) -> dict:
    return found(_store(request).get_file(file_id, key), "File object", file_id, "id")


@router.get("/files/{file_id}")
@in_store_lane
def retrieve_file(file_id: str, request: Request, key: Key):
    return file_object(_file(request, key, file_id))


@router.get("/files/{file_id}/content")
async def file_content(file_id: str, request: Request, key: Key):
    """The file's bytes, streamed from disk a block at a time, each block read in the files lane as the key's work:
    a file of hundreds of MB (a batch's output) is never held in memory."""
    f, handle = await stored(request, key, opened_file, request, key, file_id)
    media = "text/csv" if f["filename"].endswith(".csv") else "application/jsonl"
    size = os.fstat(handle.fileno()).st_size
    return StreamingResponse(blocks(request, key, handle), media_type=media, headers={"content-length": str(size)})


def opened_file(request: Request, key, file_id: str):
    """(the key's file, its bytes opened for reading): a file deleted while it is sent is sent whole."""
    f = _file(request, key, file_id)
    return f, open(f["storage"], "rb")  # noqa: SIM115 - closed by blocks()


async def blocks(request: Request, key, handle):
    """The file's blocks in order, each read in the files lane; the file closed however the response ends."""
    try:
        while block := await request.app.state.lanes.files.run(key, handle.read, COPY_BYTES, always=True):
            yield block
    finally:
        handle.close()


@router.delete("/files/{file_id}")
@in_store_lane
def delete_file(file_id: str, request: Request, key: Key):
    _file(request, key, file_id)
    _store(request).delete_file(file_id, key)
    return {"id": file_id, "object": "file", "deleted": True}


# --- fine-tuning jobs ----------------------------------------------------------------------


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"
    beta: float | Literal["auto"] | None = None


class MethodSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters = Hyperparameters()


class Method(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: MethodSpec | None = None
    dpo: MethodSpec | None = None
    reinforcement: ReinforcementMethod | None = None

    @model_validator(mode="after")
    def _reinforcement_has_a_grader(self) -> Method:
        if self.type == "reinforcement" and self.reinforcement is None:
            raise ValueError("a reinforcement job needs method.reinforcement: {grader, hyperparameters}")
        return self


class WandbSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project: str = Field(..., min_length=1)
    entity: str | None = None
    name: str | None = None
    tags: list[str] | None = None


class Integration(BaseModel):
    """A Weights & Biases integration: accepted and logged locally (nothing leaves the machine)."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["wandb"]
    wandb: WandbSpec


class JobBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = None
    metadata: Any = None  # checked by quotas.check_metadata (OpenAI's rule), a 400 naming what breaks it
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None  # the older, top-level form
    integrations: list[Integration] | None = None

    def resolved_method(self) -> dict:
        if self.method is not None:
            spec = getattr(self.method, self.method.type) or MethodSpec()
            return {"type": self.method.type, self.method.type: spec.model_dump(exclude_none=True)}
        hyper = (self.hyperparameters or Hyperparameters()).model_dump(exclude_none=True)
        return {"type": "supervised", "supervised": {"hyperparameters": hyper}}


MAX_SEED = 2**32 - 1  # the trainer seeds NumPy, which takes 0 to 2**32 - 1
# OpenAI's documented ranges: (lowest, highest or None, lowest excluded)
HYPER_RANGES = {"n_epochs": (1, 50, False), "batch_size": (1, 256, False),
                "learning_rate_multiplier": (0, None, True), "beta": (0, 2, True)}
FORMAT_NEEDS = {"supervised": "chat examples ({\"messages\": [...]})",
                "dpo": "preference pairs ({\"input\", \"preferred_output\", \"non_preferred_output\"})",
                "reinforcement": "prompts ({\"messages\": [...]} ending before the answer, plus the fields graders read)"}


def check_hyperparameters(body: JobBody) -> None:
    """Every hyperparameter in range before the job is created (400 naming the parameter)."""
    method = body.resolved_method()
    prefix = f"method.{method['type']}.hyperparameters" if body.method is not None else "hyperparameters"
    for name, value in method[method["type"]]["hyperparameters"].items():
        if value == "auto" or name not in HYPER_RANGES:
            continue
        low, high, exclusive = HYPER_RANGES[name]
        if isinstance(value, bool) or (value <= low if exclusive else value < low) or (high and value > high):
            bound = (f"greater than {low}" if exclusive else f"at least {low}") + (f" and at most {high}" if high else "")
            raise APIError(400, f"{name} must be {bound}, or 'auto'; got {value}",
                           param=f"{prefix}.{name}", code="invalid_hyperparameter")


def check_file_formats(store, key, body: JobBody) -> None:
    """The files exist for this key, were uploaded as fine-tuning data (``purpose: fine-tune``: checked then) and
    hold what the method trains on."""
    from tunesmith.data.formats.validate import upload_format

    kind = body.resolved_method()["type"]
    for param in ("training_file", "validation_file"):
        fid = getattr(body, param)
        if fid is None:
            continue
        f = store.get_file(fid, key)
        if f is None:
            raise APIError(400, f"invalid {param}: no file {fid}", param=param, code="invalid_file")
        if f["purpose"] != "fine-tune":
            raise APIError(400, f"{param} {fid} was uploaded with purpose {f['purpose']!r}; a job trains on a file "
                           "uploaded with purpose 'fine-tune'", param=param, code="invalid_file_purpose")
        found = upload_format(Path(f["storage"]))
        if found != kind:
            raise APIError(400, f"{param} {fid} holds {FORMAT_NEEDS[found]}, but a {kind} job needs "
                           f"{FORMAT_NEEDS[kind]}", param=param, code="invalid_file_format")


@router.post("/fine_tuning/jobs")
async def create_job(body: JobBody, request: Request, key: Key):
    """The job checked (its files and model in the store lane, a reinforcement job's graders in theirs), then
    created and queued."""
    model, parent, files = await stored(request, key, checked_job, request, key, body)
    method = body.resolved_method()
    if method["type"] == "reinforcement":
        await request.app.state.lanes.graders.run(key, reinforcement.check_job, request, key, method["reinforcement"],
                                                  files, sorted(request.app.state.trainable_models()))
    return await stored(request, key, queued_job, request, key, body, model, parent)


def checked_job(request: Request, key, body: JobBody) -> tuple[str, str | None, dict[str, Path]]:
    """(the model to train, the fine-tune it continues or None, a reinforcement job's files by parameter): a 400
    naming the field for anything the job cannot start from."""
    store = _store(request)
    quotas.check_metadata(body.metadata, "metadata")
    check_seed(body.seed, "seed", MAX_SEED)
    quotas.check_job(request, key)  # before the files are read; counted again with the job's insert
    check_hyperparameters(body)
    check_file_formats(store, key, body)
    model, parent = request.app.state.settings.model_aliases.get(body.model, body.model), None
    if (found_parent := store.fine_tune(model, key)) is not None:  # continued fine-tuning from the key's own
        parent, model = model, found_parent[0]["model"]
    elif model.startswith("ft:") and (store.job_by_model(model) or {}).get("owner", "") == key:
        raise APIError(400, f"model '{body.model}' cannot be fine-tuned further: it is not a succeeded fine-tune of "
                       "this key's whose weights are kept (a deleted model, or a job still running)", param="model",
                       code="model_not_available")
    if model not in request.app.state.trainable_models():
        trainable = ", ".join(sorted(request.app.state.trainable_models()))
        raise APIError(400, f"model '{body.model}' is not available for fine-tuning here; this server fine-tunes "
                       f"{trainable} (start it with --model-alias {body.model}=MODEL to map this name)",
                       param="model", code="model_not_available")
    if body.resolved_method()["type"] != "reinforcement":
        return model, parent, {}
    files = {p: Path(store.get_file(getattr(body, p), key)["storage"]) for p in ("training_file", "validation_file")
             if getattr(body, p)}
    return model, parent, files


def queued_job(request: Request, key, body: JobBody, model: str, parent: str | None) -> dict:
    """The checked job created, its validation events written and its status queued."""
    import random

    store, method = _store(request), body.resolved_method()
    integrations = [i.model_dump() for i in body.integrations] if body.integrations else None
    with quotas.room(store, key):  # counted and created in one transaction under the key's quota lock
        quotas.check_job(request, key)
        job = store.add_job(key, model=model, training_file=body.training_file, validation_file=body.validation_file,
                            suffix=body.suffix, seed=body.seed if body.seed is not None else random.randint(0, 2**31 - 1),
                            method=method, metadata=body.metadata, integrations=integrations, parent_model=parent)
    store.add_event(job["id"], f"Validating training file: {body.training_file}", dedup_key="validating")
    store.update_job(job["id"], status="queued")
    store.add_event(job["id"], "Files validated, moving job to queued state", dedup_key="queued")
    return _job_object(request, store.get_job(job["id"], key))


def _job(request: Request, key, job_id: str) -> dict:
    return found(_store(request).get_job(job_id, key), "fine-tuning job", job_id, "fine_tuning_job_id")


def metadata_filter(request: Request) -> dict[str, str] | None:
    """``metadata[k]=v`` query pairs (the client's deep-object form); ``metadata=null`` selects jobs without
    metadata and is returned as ``{}``; None: no filter."""
    params = request.query_params
    if "metadata" in params:
        if params["metadata"] != "null":
            raise APIError(400, "metadata: filter with metadata[KEY]=VALUE pairs, or metadata=null for jobs "
                           "without metadata", param="metadata", code="invalid_metadata_filter")
        return {}
    pairs = {k[len("metadata["):-1]: v for k, v in params.multi_items() if k.startswith("metadata[") and k.endswith("]")}
    return pairs or None


@router.get("/fine_tuning/jobs")
@in_store_lane
def list_jobs(request: Request, key: Key, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20):
    jobs, more = _store(request).list_jobs(key, after, limit, metadata_filter(request))
    positions = _store(request).queue_positions([j["id"] for j in jobs if j["status"] == "queued"])
    return page([job_object(j, positions.get(j["id"])) for j in jobs], more)


@router.get("/fine_tuning/jobs/{job_id}")
@in_store_lane
def retrieve_job(job_id: str, request: Request, key: Key):
    return _job_object(request, _job(request, key, job_id))


def _control(request: Request, key, job_id: str, action: str, allowed: tuple[str, ...], new_status: str | None):
    store = _store(request)
    job = _job(request, key, job_id)
    if job["status"] not in allowed:
        raise APIError(400, f"cannot {action} a job that is {job['status']}", param="fine_tuning_job_id")
    if job["status"] == "running" and action in ("cancel", "pause"):
        store.update_job(job_id, control=action)  # the worker stops within one step and sets the status
    else:
        store.update_job(job_id, status=new_status, control=None)
        done = {"cancel": "Job cancelled", "pause": "Job paused", "resume": "Job resumed"}[action]
        store.add_event(job_id, done, dedup_key=f"{action}:{job['status']}")
    return _job_object(request, store.get_job(job_id, key))


@router.post("/fine_tuning/jobs/{job_id}/cancel")
@in_store_lane
def cancel_job(job_id: str, request: Request, key: Key):
    return _control(request, key, job_id, "cancel", ("validating_files", "queued", "running", "paused"), "cancelled")


@router.post("/fine_tuning/jobs/{job_id}/pause")
@in_store_lane
def pause_job(job_id: str, request: Request, key: Key):
    return _control(request, key, job_id, "pause", ("queued", "running"), "paused")


@router.post("/fine_tuning/jobs/{job_id}/resume")
@in_store_lane
def resume_job(job_id: str, request: Request, key: Key):
    return _control(request, key, job_id, "resume", ("paused",), "queued")


def _job_page(request: Request, key, job_id: str, rows, to_object, after: str | None, limit: int) -> dict:
    """One page of a job's events or checkpoints (``rows``: the store's page of them), after checking the job
    belongs to ``key``."""
    _job(request, key, job_id)
    items, more = rows(job_id, after, limit)
    return page([to_object(x) for x in items], more)


@router.get("/fine_tuning/jobs/{job_id}/events")
@in_store_lane
def list_events(job_id: str, request: Request, key: Key, after: str | None = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 20):
    return _job_page(request, key, job_id, _store(request).events_page, event_object, after, limit)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
@in_store_lane
def list_checkpoints(job_id: str, request: Request, key: Key, after: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=100)] = 10):
    return _job_page(request, key, job_id, _store(request).checkpoints_page, checkpoint_object, after, limit)


@router.get("/fine_tuning/jobs/{job_id}/report")
@in_store_lane
def job_report(job_id: str, request: Request, key: Key):
    """The job's evaluation report (tunesmith extension): base vs fine-tuned on the validation file,
    a self-contained HTML page with its charts embedded."""
    job = _job(request, key, job_id)
    page_path = Path(job["run_dir"]) / "eval" / "report.html" if job.get("run_dir") else None
    if page_path is None or not page_path.is_file():
        raise APIError(404, f"No evaluation report for job {job_id}: reports are written for jobs with a "
                       "validation_file once training has finished", param="fine_tuning_job_id", code="not_found")
    return Response(page_path.read_text(encoding="utf-8"), media_type="text/html")
