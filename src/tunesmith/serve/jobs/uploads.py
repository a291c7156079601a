"""OpenAI's Uploads API: a file sent in parts (``uploads.create`` → ``parts.create`` … → ``complete``), what the
official client's ``uploads.upload_file_chunked`` does for a large training file.

An upload belongs to the key that created it (another key gets a 404). Each part is kept as it arrives (at most
:data:`PART_BYTES`), never past the bytes the upload declared; ``complete`` joins the parts in the order its
``part_ids`` give, checks the total against the declared ``bytes`` and the ``md5`` when one is given, runs the
checks a file of that purpose gets (every bad line named) and makes it a file like any other. The whole upload is
bounded like a single file (``--max-upload-mb``). An upload not completed within its ``expires_after`` (an hour by
default) expires; a cancelled or expired upload's parts are deleted.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, File, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from tunesmith.serve.api.auth import Key
from tunesmith.serve.api.objects import upload_object, upload_part_object
from tunesmith.serve.engines.errors import APIError, found
from tunesmith.serve.jobs.routes import checked

router = APIRouter(prefix="/v1")
PART_BYTES = 64 * 1024 * 1024  # as at OpenAI
PURPOSES = ("fine-tune", "evals")


class ExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    anchor: Literal["created_at"]
    seconds: int = Field(ge=3600, le=2_592_000)


class UploadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bytes: int = Field(ge=1)
    filename: str = Field(min_length=1, max_length=512)
    mime_type: str = Field(min_length=1, max_length=255)
    purpose: str
    expires_after: ExpiresAfter | None = None


class CompleteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    part_ids: list[str] = Field(min_length=1, max_length=10_000)
    md5: str | None = None


def _upload(request: Request, key, upload_id: str, pending: bool = True) -> dict:
    """The key's upload (404 otherwise); with ``pending``, a 400 unless parts may still be added (an expired one is
    marked so here)."""
    store = request.app.state.store
    upload = found(store.get_upload(upload_id, key), "upload", upload_id, "upload_id")
    if upload["status"] == "pending" and time.time() > upload["expires_at"]:
        store.set_upload(upload_id, "expired")
        upload["status"] = "expired"
    if pending and upload["status"] != "pending":
        raise APIError(400, f"Upload {upload_id} is {upload['status']}; only a pending upload takes parts or "
                       "completes", param="upload_id", code="invalid_upload_status")
    return upload


@router.post("/uploads")
async def create_upload(body: UploadBody, request: Request, key: Key):
    limit = request.app.state.settings.max_upload_mb * 1024 * 1024
    if body.purpose not in PURPOSES:
        raise APIError(400, f"purpose '{body.purpose}' is not supported; use {' or '.join(map(repr, PURPOSES))}",
                       param="purpose", code="invalid_value")
    if body.bytes > limit:
        raise APIError(400, f"bytes: {body.bytes:,} is more than this server's upload limit of {limit:,} bytes "
                       f"({limit // 1024 // 1024} MB)", param="bytes", code="file_too_large")
    expires = body.expires_after.seconds if body.expires_after else 3600
    upload = request.app.state.store.add_upload(key, Path(body.filename).name, body.purpose, body.bytes,
                                                body.mime_type, expires)
    return upload_object(upload)


@router.post("/uploads/{upload_id}/parts")
async def add_part(upload_id: str, request: Request, key: Key, data: Annotated[UploadFile, File()]):
    upload = _upload(request, key, upload_id)
    content = await data.read(PART_BYTES + 1)
    if len(content) > PART_BYTES:
        raise APIError(400, f"a part holds at most {PART_BYTES // 1024 // 1024} MB", param="data",
                       code="part_too_large")
    store = request.app.state.store
    received = sum(p["bytes"] for p in store.upload_parts(upload_id))
    if received + len(content) > upload["bytes"]:
        raise APIError(400, f"this part brings the upload to {received + len(content):,} bytes, more than the "
                       f"{upload['bytes']:,} it declared", param="data", code="upload_too_large")
    return upload_part_object(store.add_upload_part(upload_id, content))


def joined(paths: list[str]) -> tuple[bytes, str]:
    """The parts' bytes in order and their md5 (read off the event loop: an upload may be hundreds of MB)."""
    content = b"".join(Path(p).read_bytes() for p in paths)
    return content, hashlib.md5(content).hexdigest()  # noqa: S324 - a checksum the client compares


@router.post("/uploads/{upload_id}/complete")
async def complete_upload(upload_id: str, body: CompleteBody, request: Request, key: Key):
    upload = _upload(request, key, upload_id)
    store = request.app.state.store
    parts = {p["id"]: p for p in store.upload_parts(upload_id)}
    unknown = [pid for pid in body.part_ids if pid not in parts]
    if unknown or len(set(body.part_ids)) != len(body.part_ids):
        what = f"not parts of this upload: {unknown[:3]}" if unknown else "a part is listed twice"
        raise APIError(400, f"part_ids: {what}", param="part_ids", code="invalid_value")
    content, md5 = await request.app.state.lanes.files.run(key, joined, [parts[pid]["storage"] for pid in body.part_ids])
    if len(content) != upload["bytes"]:
        raise APIError(400, f"the parts hold {len(content):,} bytes; the upload declared {upload['bytes']:,}",
                       param="part_ids", code="upload_incomplete")
    if body.md5 is not None and md5 != body.md5.lower():
        raise APIError(400, "md5: the parts joined in this order do not have this checksum", param="md5",
                       code="checksum_mismatch")
    await checked(request, key, upload["purpose"], content, "part_ids")
    file = store.add_file(key, upload["filename"], upload["purpose"], content)
    store.set_upload(upload_id, "completed", file["id"])
    return upload_object(store.get_upload(upload_id, key), file)


@router.post("/uploads/{upload_id}/cancel")
async def cancel_upload(upload_id: str, request: Request, key: Key):
    _upload(request, key, upload_id)
    request.app.state.store.set_upload(upload_id, "cancelled")
    return upload_object(request.app.state.store.get_upload(upload_id, key))
