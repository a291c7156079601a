"""OpenAI's Uploads API: a file sent in parts (``uploads.create`` → ``parts.create`` … → ``complete``), what the
official client's ``uploads.upload_file_chunked`` does for a large training file.

An upload belongs to the key that created it (another key gets a 404). Each part is kept as it arrives (at most
:data:`PART_BYTES`), never past the bytes the upload declared; ``complete`` joins the parts in the order its
``part_ids`` give, checks the total against the declared ``bytes`` and the ``md5`` when one is given, runs the
checks a file of that purpose gets (every bad line named) and makes it a file like any other; ``expires_after`` is
that file's life, as at OpenAI. The whole upload is bounded like a single file (``--max-upload-mb``) and counts
against the key's file quotas from its creation (:mod:`tunesmith.serve.store.quotas`). An upload not completed within an
hour (``--quota upload_expiry_s``) expires; a cancelled or expired upload's parts are deleted (expired ones by the
server's sweep, whether or not the upload is touched again).

Every change of an upload's status is one conditional SQL update (``… WHERE status = 'pending'``), so two
``complete`` calls racing make one file (the other is a 400), and a part arriving while its upload is cancelled is
not kept. The store's work runs in the store lane, the parts' bytes in the files lane: none on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, File, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from tunesmith.serve.api.auth import Key
from tunesmith.serve.api.json_body import OffLoopJSON
from tunesmith.serve.api.objects import upload_object, upload_part_object
from tunesmith.serve.api.store_lane import in_store_lane, stored
from tunesmith.serve.errors import APIError, found
from tunesmith.serve.jobs.routes import COPY_BYTES, FILENAME_CHARS, checked, kept_file, received
from tunesmith.serve.store import new_id, quotas
from tunesmith.serve.store.values import check_name

router = APIRouter(prefix="/v1", route_class=OffLoopJSON)
PART_BYTES = 64 * 1024 * 1024  # as at OpenAI
PURPOSES = ("fine-tune", "evals")


class ExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    anchor: Literal["created_at"]
    seconds: int = Field(ge=3600, le=2_592_000)


class UploadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bytes: int = Field(ge=1)
    filename: str = Field(min_length=1, max_length=FILENAME_CHARS)
    mime_type: str = Field(min_length=1, max_length=255)
    purpose: str
    expires_after: ExpiresAfter | None = None  # the life of the file the upload becomes


class CompleteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    part_ids: list[str] = Field(min_length=1, max_length=10_000)
    md5: str | None = None


def _upload(request: Request, key, upload_id: str) -> dict:
    """The key's upload (404 otherwise); a 400 unless it is pending (an expired one is marked so here)."""
    store = request.app.state.store
    upload = found(store.get_upload(upload_id, key), "upload", upload_id, "upload_id")
    if upload["status"] == "pending" and time.time() > upload["expires_at"] and moved(store, upload_id, "pending",
                                                                                     "expired"):
        upload["status"] = "expired"
    if upload["status"] != "pending":
        raise not_pending(upload_id, upload["status"])
    return upload


def not_pending(upload_id: str, status: str) -> APIError:
    doing = "another request is completing it" if status == "completing" else f"it is {status}"
    return APIError(400, f"Upload {upload_id}: {doing}; only a pending upload takes parts, completes or is cancelled",
                    param="upload_id", code="invalid_upload_status")


def moved(store, upload_id: str, old: str, new: str, file_id: str | None = None) -> bool:
    """The upload's status from ``old`` to ``new`` if it still is ``old`` (one statement: a racing request sees one
    or the other); once it holds no more parts (anything but pending or completing) its parts are deleted."""
    with store.lock:
        changed = store.db.execute("UPDATE uploads SET status = ?, file_id = COALESCE(?, file_id) WHERE id = ? AND "
                                   "status = ?", (new, file_id, upload_id, old)).rowcount == 1
        parts = []
        if changed and new not in quotas.LIVE_UPLOAD:
            parts = store.db.execute("SELECT storage FROM upload_parts WHERE upload_id = ?", (upload_id,)).fetchall()
            store.db.execute("DELETE FROM upload_parts WHERE upload_id = ?", (upload_id,))
    for part in parts:
        Path(part[0]).unlink(missing_ok=True)
    return changed


@router.post("/uploads")
@in_store_lane
def create_upload(body: UploadBody, request: Request, key: Key):
    limit = request.app.state.settings.max_upload_mb * 1024 * 1024
    if body.purpose not in PURPOSES:
        raise APIError(400, f"purpose '{body.purpose}' is not supported; use {' or '.join(map(repr, PURPOSES))}",
                       param="purpose", code="invalid_value")
    if body.bytes > limit:
        raise APIError(400, f"bytes: {body.bytes:,} is more than this server's upload limit of {limit:,} bytes "
                       f"({limit // 1024 // 1024} MB)", param="bytes", code="file_too_large")
    filename = check_name(Path(body.filename).name, "filename", FILENAME_CHARS)
    store = request.app.state.store
    with quotas.room(store, key):  # counted and created in one transaction under the key's quota lock
        quotas.check_file(request, key, body.bytes, pending_upload=True)
        upload = store.add_upload(key, filename, body.purpose, body.bytes, body.mime_type,
                                  quotas.quotas_of(request).upload_expiry_s)
        if body.expires_after is not None:  # the life of the file it becomes, from that file's creation
            with store.lock:
                store.db.execute("UPDATE uploads SET file_expires_s = ? WHERE id = ?",
                                 (body.expires_after.seconds, upload["id"]))
    return upload_object(upload)


@router.post("/uploads/{upload_id}/parts")
async def add_part(upload_id: str, request: Request, key: Key, data: Annotated[UploadFile, File()]):
    """A part kept: its bytes, spooled by Starlette (never held in memory past 1 MB), copied into the store's folder
    in the files lane."""
    await stored(request, key, _upload, request, key, upload_id)
    if data.size is not None and data.size > PART_BYTES:
        raise APIError(400, f"a part holds at most {PART_BYTES // 1024 // 1024} MB", param="data",
                       code="part_too_large")
    store = request.app.state.store
    part = await request.app.state.lanes.files.run(key, kept_part, store, upload_id, data.file)
    if part is None:  # cancelled, expired or completed while the part arrived, or past the declared bytes
        raise await stored(request, key, too_large, request, key, upload_id, data.size or 0)
    return upload_part_object(part)


def too_large(request: Request, key, upload_id: str, size: int) -> APIError:
    """Why a part of ``size`` bytes was not kept: its upload no longer pending (that 400, raised), or the bytes past
    what the upload declared (the 400 returned)."""
    upload = _upload(request, key, upload_id)
    received = request.app.state.store.db.execute("SELECT COALESCE(SUM(bytes), 0) FROM upload_parts WHERE "
                                                  "upload_id = ?", (upload_id,)).fetchone()[0]
    return APIError(400, f"this part brings the upload to {received + size:,} bytes, more than the "
                    f"{upload['bytes']:,} it declared", param="data", code="upload_too_large")


def kept_part(store, upload_id: str, spooled) -> dict | None:
    """The part copied from ``spooled`` and recorded if, at the moment it is recorded, its upload is still pending and
    has room for it (one statement); else None, and its bytes are deleted."""
    pid, now = new_id("part"), int(time.time())
    storage = received(store, spooled)
    size = storage.stat().st_size
    with store.lock:
        kept = store.db.execute(
            "INSERT INTO upload_parts (id, upload_id, created_at, bytes, storage) SELECT ?, ?, ?, ?, ? FROM uploads u "
            "WHERE u.id = ? AND u.status = 'pending' AND u.bytes >= ? + (SELECT COALESCE(SUM(bytes), 0) FROM "
            "upload_parts WHERE upload_id = u.id)",
            (pid, upload_id, now, size, str(storage), upload_id, size)).rowcount == 1
    if not kept:
        storage.unlink(missing_ok=True)
        return None
    return {"id": pid, "upload_id": upload_id, "created_at": now}


def joined(store, paths: list[str]) -> tuple[Path, str]:
    """The parts joined in order into one part file of the store's folder, a block at a time, and their md5 (off the
    event loop, never in memory: an upload may be hundreds of MB)."""
    digest = hashlib.md5()  # noqa: S324 - a checksum the client compares
    out = store.root / "files" / f"part-{secrets.token_hex(16)}.bin"
    try:
        with out.open("wb") as sink:
            for path in paths:
                with open(path, "rb") as part:
                    while block := part.read(COPY_BYTES):
                        digest.update(block)
                        sink.write(block)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return out, digest.hexdigest()


@router.post("/uploads/{upload_id}/complete")
async def complete_upload(upload_id: str, body: CompleteBody, request: Request, key: Key):
    """The upload's parts as one file: the upload is ``completing`` while its parts are joined and checked (a second
    ``complete`` meanwhile is a 400), ``completed`` with its file after, and ``pending`` again when a check fails.
    Each store step runs in the store lane; a client that leaves midway leaves the upload pending or completed,
    never completing."""
    move = asyncio.ensure_future(stored(request, key, completing, request, key, upload_id))
    try:
        upload, parts = await asyncio.shield(move)
        content = await checked_content(request, key, upload, parts, body)
    except BaseException:
        await asyncio.shield(back_to_pending(request, key, upload_id, move))
        raise
    return await asyncio.shield(stored(request, key, completed, request, key, upload, content, always=True))


def completing(request: Request, key, upload_id: str) -> tuple[dict, dict[str, dict]]:
    """The key's pending upload moved to ``completing`` (a 400 when another request moved it first) and its parts
    by id."""
    upload = _upload(request, key, upload_id)
    store = request.app.state.store
    if not moved(store, upload_id, "pending", "completing"):
        raise not_pending(upload_id, store.get_upload(upload_id, key)["status"])
    try:
        return upload, {p["id"]: p for p in store.upload_parts(upload_id)}
    except BaseException:
        moved(store, upload_id, "completing", "pending")
        raise


async def back_to_pending(request: Request, key, upload_id: str, move: asyncio.Future) -> None:
    """The upload ``pending`` again once ``move`` (:func:`completing`, maybe still running for a client that left)
    has made it ``completing``; nothing when it did not."""
    try:
        await move
    except BaseException:  # noqa: BLE001 - not moved: refused, not pending, or the server stopping
        return
    await stored(request, key, moved, request.app.state.store, upload_id, "completing", "pending", always=True)


def completed(request: Request, key, upload: dict, content: Path) -> dict:
    """The checked ``content`` made the upload's file (its place in the key's quota was taken at the upload's
    creation) and the upload ``completed`` with it; a 400 (and the file deleted) when the sweep expired it meanwhile."""
    store, upload_id = request.app.state.store, upload["id"]
    try:
        file = kept_file(request, key, upload["filename"], upload["purpose"], content, upload.get("file_expires_s"),
                         counted=False)
    finally:
        content.unlink(missing_ok=True)  # kept: moved into the store
    if not moved(store, upload_id, "completing", "completed", file["id"]):
        store.delete_file(file["id"], key)
        raise not_pending(upload_id, store.get_upload(upload_id, key)["status"])
    return upload_object(store.get_upload(upload_id, key), file)


async def checked_content(request: Request, key, upload: dict, parts: dict[str, dict], body: CompleteBody) -> Path:
    """The upload's ``parts`` joined in the order ``part_ids`` gives into one file, after every check (400 naming the
    field; the joined file deleted then)."""
    unknown = [pid for pid in body.part_ids if pid not in parts]
    if unknown or len(set(body.part_ids)) != len(body.part_ids):
        what = f"not parts of this upload: {unknown[:3]}" if unknown else "a part is listed twice"
        raise APIError(400, f"part_ids: {what}", param="part_ids", code="invalid_value")
    if (size := sum(parts[pid]["bytes"] for pid in body.part_ids)) != upload["bytes"]:
        raise APIError(400, f"the parts hold {size:,} bytes; the upload declared {upload['bytes']:,}",
                       param="part_ids", code="upload_incomplete")
    content, md5 = await request.app.state.lanes.files.run(key, joined, request.app.state.store,
                                                           [parts[pid]["storage"] for pid in body.part_ids])
    try:
        if body.md5 is not None and md5 != body.md5.lower():
            raise APIError(400, "md5: the parts joined in this order do not have this checksum", param="md5",
                           code="checksum_mismatch")
        await checked(request, key, upload["purpose"], content, "part_ids")
    except BaseException:
        content.unlink(missing_ok=True)
        raise
    return content


@router.post("/uploads/{upload_id}/cancel")
@in_store_lane
def cancel_upload(upload_id: str, request: Request, key: Key):
    _upload(request, key, upload_id)
    store = request.app.state.store
    if not moved(store, upload_id, "pending", "cancelled"):
        raise not_pending(upload_id, store.get_upload(upload_id, key)["status"])
    return upload_object(store.get_upload(upload_id, key))
