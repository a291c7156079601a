"""``GET /v1/models/{model}`` and ``DELETE /v1/models/{model}``: a key sees and deletes its own fine-tunes.

Another key's fine-tune is a 404, exactly as a model that does not exist; the base model and its aliases
cannot be deleted (403). A deleted fine-tune stops being served at once, on every replica (each looks the model up
in the store at its next request for it), and is not loaded again; its job keeps its record, as at OpenAI.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from tunesmith.serve.api.auth import Key
from tunesmith.serve.api.json_body import OffLoopJSON
from tunesmith.serve.api.store_lane import stored
from tunesmith.serve.errors import APIError

router = APIRouter(prefix="/v1", route_class=OffLoopJSON)


def _fine_tune_or_fixed(request: Request, model: str, key: str | None) -> bool:
    """True for a fine-tune or checkpoint of ``key``'s, False for a model served to every key; a 404 otherwise."""
    models = request.app.state.models
    if model in models.fixed():
        return False
    if models.owned(model, key):
        return True
    raise APIError(404, f"The model '{model}' does not exist or you do not have access to it.", param="model",
                   code="model_not_found")


@router.get("/models/{model:path}")
async def retrieve_model(model: str, request: Request, key: Key):
    await stored(request, key, _fine_tune_or_fixed, request, model, key)
    engine, models = request.app.state.engine, request.app.state.models
    parent = None if model == engine.base_name else engine.aliases.get(model, models.parents.get(model, engine.base_name))
    return {"id": model, "object": "model", "created": int(time.time()), "owned_by": "tunesmith", "parent": parent}


@router.delete("/models/{model:path}")
async def delete_model(model: str, request: Request, key: Key):
    """Mark the fine-tune deleted in the store (every replica refuses it from its next request on), unload it here.
    A second delete while the first unloads it is a 404, as after it: the model is claimed
    (``app.state.models_deleting``) before the first ``await``."""
    deleting = request.app.state.__dict__.setdefault("models_deleting", set())
    if model in deleting:
        raise APIError(404, f"The model '{model}' does not exist or you do not have access to it (it is being "
                       "deleted).", param="model", code="model_not_found")
    deleting.add(model)
    try:
        await stored(request, key, _delete, request, model, key)
    finally:
        deleting.discard(model)
    return {"id": model, "object": "model", "deleted": True}


def _delete(request: Request, model: str, key: str | None) -> None:
    if not _fine_tune_or_fixed(request, model, key):
        raise APIError(403, f"The model '{model}' is not a fine-tune of yours: only fine-tuned models and their "
                       "checkpoints can be deleted", param="model", code="model_not_deletable")
    store = request.app.state.store
    job = store.job_by_model(model)
    if job is not None:
        store.update_job(job["id"], model_deleted=1)
    else:  # a checkpoint: its row goes, so it is neither listed nor loaded again
        store.delete_checkpoint(model)
    request.app.state.models.forget(model)  # vLLM's unload waits for vLLM: in the lane's thread, not on the loop
