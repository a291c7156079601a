"""The API key every route of the server checks, and what a key may see: the base model and command-line adapters,
plus the fine-tuned models of its own jobs (another key's are a 404, as for a model that does not exist).

A route gets the caller's owner id (:func:`tunesmith.serve.store.keys.owner_id`), never the key: that is what the store
keeps and compares, so no table holds a key."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from tunesmith.serve.errors import APIError
from tunesmith.serve.store.keys import owner_id, server_secret


def bearer(header: str) -> str | None:
    """The key an ``Authorization: Bearer <key>`` header carries (None without one)."""
    return header[7:].strip() if header.lower().startswith("bearer ") else None


def bearer_of(scope) -> str | None:
    """The key an ASGI scope's ``Authorization: Bearer`` header carries (for middlewares, before any route)."""
    return bearer(dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1"))


TINKER_PREFIX = "tml-"  # the Tinker SDK refuses a key without it: a tunesmith key is sent as tml-<key>


def tinker_key(header: str) -> str | None:
    """The key a Tinker SDK's ``X-API-Key`` header carries: ``tml-<key>`` for a tunesmith key (the SDK sends only
    keys that start with ``tml-``); a configured key that itself starts with ``tml-`` is matched whole first."""
    return header.strip() or None


def tinker_candidates(key: str | None) -> list[str]:
    """The configured keys an ``X-API-Key`` value may be: itself, and without its ``tml-`` prefix."""
    if key is None:
        return []
    return [key, key[len(TINKER_PREFIX):]] if key.startswith(TINKER_PREFIX) else [key]


def tinker_key_of(scope) -> str | None:
    """The key an ASGI scope's ``X-API-Key`` header carries, as :func:`tinker_key` reads it."""
    return tinker_key(dict(scope.get("headers") or []).get(b"x-api-key", b"").decode("latin-1"))


OWNER_SCOPE = "tunesmith.owner"  # on an in-process call's ASGI scope (a batch's line): the owner id it runs as


def _owner_ids(app) -> dict[str, str]:
    """Each configured key → its owner id, computed once per app (an HMAC per request would be wasted work)."""
    ids = getattr(app.state, "owner_ids", None)
    if ids is None:
        secret = server_secret(app.state.store.root)  # the folder whose migration keyed the owners
        ids = app.state.owner_ids = {k: owner_id(secret, k) for k in app.state.settings.api_keys}
    return ids


def _configured(keys, key: str | None) -> str | None:
    """The configured key equal to ``key``, compared in constant time against every one (how long the check takes
    says nothing about how much of a guess was right); None when none is."""
    if key is None:
        return None
    given, match = key.encode("utf-8", "surrogatepass"), None
    for k in keys:
        if hmac.compare_digest(given, k.encode("utf-8", "surrogatepass")):
            match = k
    return match


def owner_of(app, key: str | None) -> str | None:
    """The owner id of a raw bearer ``key`` for code outside a route (an ASGI middleware): None when the key is not
    one of the server's, or the server has no keys."""
    keys = app.state.settings.api_keys
    match = _configured(keys, key) if keys else None
    return None if match is None else _owner_ids(app)[match]


def api_key(request: Request) -> str | None:
    """The caller's owner id (it scopes files, jobs and everything else a key keeps); 401 when keys are configured
    and the bearer is none of them; None on a server without keys. A call made in process (a batch's line)
    carries its owner id on its ASGI scope, which no HTTP client can set."""
    if OWNER_SCOPE in request.scope:
        return request.scope[OWNER_SCOPE]
    keys = request.app.state.settings.api_keys
    if not keys:
        return None
    match = _configured(keys, bearer(request.headers.get("authorization", "")))
    if match is None:
        raise APIError(401, "Missing or invalid API key. Send 'Authorization: Bearer <key>'.", code="invalid_api_key")
    return _owner_ids(request.app)[match]


Key = Annotated[str | None, Depends(api_key)]


def tinker_api_key(request: Request) -> str | None:
    """The caller's owner id on the Tinker API (``X-API-Key: tml-<key>``); 401 when keys are configured and the
    header carries none of them; None on a server without keys."""
    keys = request.app.state.settings.api_keys
    if not keys:
        return None
    for candidate in tinker_candidates(tinker_key(request.headers.get("x-api-key", ""))):
        if (match := _configured(keys, candidate)) is not None:
            return _owner_ids(request.app)[match]
    raise APIError(401, "Missing or invalid API key. Send 'X-API-Key: tml-<your tunesmith key>' (the Tinker SDK's "
                   "api_key='tml-<key>', or TINKER_API_KEY).", code="invalid_api_key")


TinkerKey = Annotated[str | None, Depends(tinker_api_key)]


def visible_models(request: Request, key: str | None) -> list[str]:
    """The base model and command-line adapters, plus this owner's own fine-tunes (from the store: the same on every
    replica)."""
    return request.app.state.models.listed(key)


async def engine_for(request: Request, model: str, key: str | None):
    """The engine serving ``model`` to ``key``, the fine-tune found by name and loaded on first use (in the planning
    lane: a store lookup and maybe a load, never on the event loop); a 404 in OpenAI's shape when it is not served
    to this key."""
    models = request.app.state.models

    def served() -> list[str] | None:  # None: served; otherwise what this key may ask instead
        return None if models.resolve(model, key) else models.listed(key)

    if (available := await request.app.state.lanes.plan.run(key, served)) is not None:
        raise APIError(404, f"The model '{model}' does not exist or you do not have access to it. "
                       f"Available: {', '.join(available)}", param="model", code="model_not_found")
    return request.app.state.engine
