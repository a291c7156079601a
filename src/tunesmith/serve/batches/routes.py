"""``/v1/batches``: create a batch from a ``purpose: "batch"`` file, retrieve, list, cancel, as the official client
calls them. Every batch belongs to its key (another key gets a 404, as for an id that does not exist). The store's
work runs in the store lane, the input file's scan in the files lane; the batch runner is told on the event loop."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict

from tunesmith.serve.api.auth import Key
from tunesmith.serve.api.json_body import OffLoopJSON
from tunesmith.serve.api.objects import page
from tunesmith.serve.api.store_lane import in_store_lane, stored
from tunesmith.serve.batches.lines import URLS
from tunesmith.serve.batches.output import scan_input
from tunesmith.serve.batches.store import BatchStore
from tunesmith.serve.errors import APIError, found
from tunesmith.serve.jobs.uploads import ExpiresAfter
from tunesmith.serve.store import quotas

router = APIRouter(prefix="/v1", route_class=OffLoopJSON)
WINDOW_S = 24 * 3600


class BatchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_file_id: str
    endpoint: str
    completion_window: Literal["24h"]
    metadata: Any = None  # OpenAI's rule, checked with the quotas (tunesmith.serve.store.quotas.check_metadata)
    output_expires_after: ExpiresAfter | None = None  # the output and error files' life after they are made


def batch_object(b: dict) -> dict:
    """OpenAI's Batch."""
    fields = ("id", "endpoint", "input_file_id", "completion_window", "status", "output_file_id", "error_file_id",
              "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
              "cancelling_at", "cancelled_at", "metadata", "model", "request_counts")
    doc = {k: b.get(k) for k in fields} | {"object": "batch"}
    if doc["status"] == "finalizing" and doc["cancelling_at"] is not None:
        doc["status"] = "cancelling"  # a cancelled batch winding down is cancelling until cancelled, as OpenAI's are
    doc["errors"] = {"object": "list", "data": b["errors"]} if b.get("errors") else None
    if b.get("usage"):
        doc["usage"] = b["usage"]
    return doc


@router.post("/batches")
async def create_batch(body: BatchBody, request: Request, key: Key):
    if body.endpoint not in URLS:
        raise APIError(400, f"endpoint {body.endpoint!r} is not batched here; one of {', '.join(URLS)}",
                       param="endpoint", code="invalid_value")
    f = await stored(request, key, request.app.state.store.get_file, body.input_file_id, key)
    if f is None:
        raise APIError(400, f"input_file_id: no file {body.input_file_id}", param="input_file_id")
    if f["purpose"] != "batch":
        raise APIError(400, f"input_file_id: {body.input_file_id} was uploaded with purpose {f['purpose']!r}; upload "
                       "the requests with purpose 'batch'", param="input_file_id", code="invalid_file_purpose")
    count, model, wrong = await request.app.state.lanes.files.run(key, scan_input, f["storage"], body.endpoint)
    if wrong is not None:
        raise APIError(400, f"input_file_id: line {wrong['line']} asks {wrong['url']}, not the batch's endpoint "
                       f"{body.endpoint}", param="input_file_id", code="mixed_endpoints")
    batch = await stored(request, key, new_batch, request, key, body, count, model)
    request.app.state.batch_runner.wake()
    return batch_object(batch)


def new_batch(request: Request, key, body: BatchBody, count: int, model: str | None) -> dict:
    """The batch created, once the key's quotas have room for it (counted in the transaction that creates it)."""
    expires = body.output_expires_after.seconds if body.output_expires_after else None
    with quotas.room(request.app.state.store, key):  # counted and created in one transaction under the key's lock
        quotas.check_batch_create(request, key, body.metadata, count)
        return BatchStore(request.app.state.store).add(key, body.endpoint, body.input_file_id, body.metadata, count,
                                                       model, WINDOW_S, expires)


@router.get("/batches/{batch_id}")
@in_store_lane
def retrieve_batch(batch_id: str, request: Request, key: Key):
    return batch_object(_batch(request, key, batch_id))


@router.get("/batches")
@in_store_lane
def list_batches(request: Request, key: Key, after: str | None = None,
                 limit: Annotated[int, Query(ge=1, le=100)] = 20):
    items, more = BatchStore(request.app.state.store).list(key, after, limit)
    return page([batch_object(b) for b in items], more)


@router.post("/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request, key: Key):
    """Stops the batch within seconds: no new request starts, those running end, what finished is kept in its
    output and error files."""
    if await stored(request, key, cancelling, request, key, batch_id):
        request.app.state.batch_runner.cancel(batch_id)  # its tasks live on the event loop
    return batch_object(await stored(request, key, _batch, request, key, batch_id))


def cancelling(request: Request, key, batch_id: str) -> bool:
    """The batch marked ``cancelling`` (True) unless it already is (False); a 409 once it has ended."""
    batch = _batch(request, key, batch_id)
    if BatchStore(request.app.state.store).cancel(batch_id):
        return True
    batch = _batch(request, key, batch_id)  # it moved on meanwhile: as it is now
    if batch["status"] != "cancelling":
        raise APIError(409, f"Batch {batch_id} is {batch['status']} and cannot be cancelled", param="batch_id",
                       code="invalid_batch_status")
    return False


def _batch(request: Request, key, batch_id: str) -> dict:
    return found(BatchStore(request.app.state.store).get(batch_id, key), "batch", batch_id, "batch_id")
