"""The API key every route of the server checks, and what a key may see: the base model and command-line adapters,
plus the fine-tuned models of its own jobs (another key's are a 404, as for a model that does not exist)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from tunesmith.serve.engines.errors import APIError


def bearer(header: str) -> str | None:
    """The key an ``Authorization: Bearer <key>`` header carries (None without one)."""
    return header[7:].strip() if header.lower().startswith("bearer ") else None


OWNER_SCOPE = "tunesmith.owner"  # on an in-process call's ASGI scope (a batch's line): the owner it runs as


def api_key(request: Request) -> str | None:
    """The caller's key (it scopes files and jobs); 401 when keys are configured and it is wrong. A call made in
    process (a batch's line) carries its owner on its ASGI scope, which no HTTP client can set."""
    if OWNER_SCOPE in request.scope:
        return request.scope[OWNER_SCOPE]
    keys = request.app.state.settings.api_keys
    key = bearer(request.headers.get("authorization", ""))
    if keys and key not in keys:
        raise APIError(401, "Missing or invalid API key. Send 'Authorization: Bearer <key>'.", code="invalid_api_key")
    return key


Key = Annotated[str | None, Depends(api_key)]


def visible_models(request: Request, key: str | None) -> list[str]:
    """The base model and command-line adapters, plus the fine-tuned models of this key's own jobs."""
    request.app.state.sync_adapters()
    owners = request.app.state.model_owners
    return [m for m in request.app.state.engine.model_ids() if m not in owners or owners[m] == key]


def engine_for(request: Request, model: str, key: str | None):
    """The engine serving ``model`` to ``key``; a 404 in OpenAI's shape when it is not served to this key."""
    models = visible_models(request, key)
    if model not in models and not request.app.state.serve_checkpoint(model, key):
        raise APIError(404, f"The model '{model}' does not exist or you do not have access to it. "
                       f"Available: {', '.join(models)}", param="model", code="model_not_found")
    return request.app.state.engine
