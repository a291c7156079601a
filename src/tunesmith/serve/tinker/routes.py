"""The Tinker API's routes (``/api/v1/...``, the wire of the ``tinker`` SDK 0.38.0), so that
``tinker.ServiceClient(base_url=<server>, api_key="tml-<key>")`` trains and samples here unchanged.

Each route reads its body as the SDK sends it (JSON; forward_backward in protobuf, :mod:`tunesmith.serve.tinker.wire`)
and refuses a field it does not know with a 400 naming it. Training and sampling calls answer a future at once;
``retrieve_future`` returns its answer. Routes the SDK has that this server does not serve answer 400 naming the
route and what to do instead."""

from __future__ import annotations

import json
import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from tunesmith.serve.api.auth import TinkerKey
from tunesmith.serve.api.store_lane import stored
from tunesmith.serve.errors import APIError
from tunesmith.serve.store import new_id
from tunesmith.serve.tinker.losses import TrainingError
from tunesmith.serve.tinker.service import Tinker, run_name, run_session

log = logging.getLogger("tunesmith.serve")
router = APIRouter(prefix="/api/v1")
PROTO = "application/x-protobuf"
SDK_VERSION = "0.38.0"  # the SDK whose wire this is
CLIENT_CONFIG = {"pjwt_auth_enabled": False, "credential_default_source": "api_key", "parallel_fwdbwd_chunks": False,
                 "proto_compress_fwdbwd": False, "use_pyqwest_transport": False, "sample_use_retrieve_futures": False,
                 "custom_loss_server_side": False, "sample_join_sampling_session": False}
NOT_SERVED = {
    "auth/token": "this server takes API keys only (X-API-Key: tml-<key>), not JWT exchange",
    "create_custom_loss": "custom losses run on the client here: forward_backward_custom works as is",
    "join_sampling_session": "sampling sessions are not shared between clients here; create one per client",
    "copy_weights": "checkpoints stay under the key that saved them",
    "save_weights_external": "checkpoints are saved on this server's data folder; export them with tunesmith export",
    "retrieve_futures": "poll each future with retrieve_future",
}


def tinker(request: Request) -> Tinker:
    return request.app.state.tinker


async def body_of(request: Request, allowed: set[str], required: set[str] = frozenset()) -> dict:
    """The JSON object the SDK sent, with no field outside ``allowed`` and every one of ``required``."""
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError as exc:
        raise APIError(400, f"The body is not JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "The body must be a JSON object.", code="invalid_json")
    if unknown := sorted(set(body) - allowed - {"type"}):
        raise APIError(400, f"Unrecognized field {unknown[0]!r}: this server (the Tinker API of SDK {SDK_VERSION}) "
                       "does not honour it.", param=unknown[0], code="unrecognized_argument")
    if missing := sorted(required - set(body)):
        raise APIError(400, f"Missing field {missing[0]!r}.", param=missing[0], code="missing_required_parameter")
    return body


def check_known(value: dict, allowed: set[str], param: str) -> None:
    """A nested object of the body (``lora_config``, ``adam_params``, ``sampling_params``) with no field outside
    ``allowed``."""
    if unknown := sorted(set(value) - allowed):
        raise APIError(400, f"Unrecognized {param} field {unknown[0]!r}.", param=param, code="unrecognized_argument")


async def future(request: Request, key, kind: str, fn, *args, model_id: str | None = None,
                 fusable: bool = False) -> dict:
    """``fn(*args)`` queued as the key's call (in the order calls arrive), its future's row written in the store
    before its id is answered."""
    futures = tinker(request).futures
    rid = futures.submit(key, kind, fn, *args, fusable=fusable)
    await futures.recorded(rid)
    return {"request_id": rid, "model_id": model_id}


# --- the service ---------------------------------------------------------------------------------------------------

@router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@router.post("/client/config")
async def client_config(request: Request, key: TinkerKey):
    await body_of(request, {"sdk_version"})
    return CLIENT_CONFIG


@router.post("/client/dynamic_config")
async def dynamic_config(request: Request, key: TinkerKey):
    await body_of(request, {"sdk_version"})
    return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}


@router.get("/get_server_capabilities")
async def capabilities(request: Request, key: TinkerKey):
    engine = request.app.state.engine
    return {"supported_models": [{"model_name": tinker(request).base, "trainable": True, "sampleable": True,
                                  "max_context_length": getattr(engine, "context_length", None)}]}


@router.post("/create_session")
async def create_session(request: Request, key: TinkerKey):
    await body_of(request, {"tags", "user_metadata", "sdk_version", "project_id", "display_name"})
    return {"type": "create_session", "session_id": new_id("session")}


@router.post("/session_heartbeat")
async def session_heartbeat(request: Request, key: TinkerKey):
    await body_of(request, {"session_id"}, {"session_id"})
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
async def finish_session(session_id: str, request: Request, key: TinkerKey):
    """A client's session ended (``ServiceClient.close``): the training runs it made on this replica are let go (their
    rows and checkpoints stay; a new client loads a saved state)."""
    await body_of(request, {"reason", "detail"})
    t = tinker(request)
    await t.futures.lane.run(key, t.finish_session, key, session_id, always=True)  # after the key's calls queued
    return {}


@router.post("/telemetry")
async def telemetry(request: Request, key: TinkerKey):
    """The SDK's reports of its own errors: each exception it reports is a line of this server's log (where an
    operator sees a client's failures); the rest are counted. ``TINKER_TELEMETRY=0`` on the client stops them."""
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise APIError(400, "The body is not JSON.", code="invalid_json") from None
    events = (body.get("events") if isinstance(body, dict) else None) or []
    for event in events:
        if isinstance(event, dict) and event.get("event") in ("UNHANDLED_EXCEPTION", "unhandled_exception"):
            log.warning("Tinker client of key %s reported: %s", (key or "-")[:12], str(event)[:500])
    log.debug("Tinker client telemetry: %d events", len(events))
    return {"status": "accepted"}


# --- training ------------------------------------------------------------------------------------------------------

@router.post("/create_model")
async def create_model(request: Request, key: TinkerKey):
    body = await body_of(request, {"session_id", "model_seq_id", "base_model", "user_metadata", "lora_config",
                                   "optimizer_config"}, {"session_id", "model_seq_id", "base_model"})
    check_optimizer(body.get("optimizer_config"))
    lora = body.get("lora_config") or {"rank": 32}
    check_known(lora, {"rank", "seed", "train_unembed", "train_mlp", "train_attn"}, "lora_config")
    t = tinker(request)
    return await future(request, key, "create_model", t.create_model, key, body["session_id"], int(body["model_seq_id"]),
                  body["base_model"], lora, body.get("user_metadata"))


def check_optimizer(config: dict | None) -> None:
    if config is not None and config.get("type", "adamw") != "adamw":
        raise APIError(400, f"optimizer_config type {config.get('type')!r} is not supported here; use adamw",
                       param="optimizer_config", code="unsupported_value")


@router.post("/get_info")
async def get_info(request: Request, key: TinkerKey):
    body = await body_of(request, {"model_id"}, {"model_id"})
    return await stored(request, key, tinker(request).info, key, body["model_id"])


@router.post("/forward_backward")
async def forward_backward(request: Request, key: TinkerKey):
    if PROTO not in request.headers.get("content-type", ""):
        raise APIError(400, f"forward_backward takes a protobuf body ({PROTO}), as the SDK sends it.",
                       code="invalid_content_type")
    if request.headers.get("content-encoding", "identity") != "identity":
        raise APIError(400, "Send forward_backward uncompressed (this server's client config says so).",
                       code="unsupported_encoding")
    body = await request.body()
    t = tinker(request)
    return await future(request, key, "forward_backward", t.forward_backward, key, body, True, fusable=True)


@router.post("/optim_step")
async def optim_step(request: Request, key: TinkerKey):
    body = await body_of(request, {"model_id", "seq_id", "adam_params", "optimizer_params"}, {"model_id"})
    if "optimizer_params" in body:
        raise APIError(400, "optimizer_params (a non-Adam optimizer) is not supported here; send adam_params",
                       param="optimizer_params", code="unsupported_value")
    adam = body.get("adam_params") or {}
    check_known(adam, {"learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"}, "adam_params")
    t = tinker(request)
    return await future(request, key, "optim_step", t.optim_step, key, body["model_id"], adam, model_id=body["model_id"])


@router.post("/save_weights")
async def save_weights(request: Request, key: TinkerKey):
    body = await body_of(request, {"model_id", "path", "seq_id", "ttl_seconds", "overwrite", "user_metadata"},
                         {"model_id"})
    t = tinker(request)
    return await future(request, key, "save_weights", t.save, key, body["model_id"], body.get("path"), "weights",
                  bool(body.get("overwrite")), body.get("user_metadata"), body.get("ttl_seconds"),
                  model_id=body["model_id"])


@router.post("/save_weights_for_sampler")
async def save_weights_for_sampler(request: Request, key: TinkerKey):
    body = await body_of(request, {"model_id", "path", "sampling_session_seq_id", "kind", "seq_id", "ttl_seconds",
                                   "user_metadata"}, {"model_id"})
    if body.get("kind", "snapshot") != "snapshot":
        raise APIError(400, f"kind {body['kind']!r} is not supported here; sampler weights are snapshots",
                       param="kind", code="unsupported_value")
    t = tinker(request)

    def saved() -> dict:
        answer = t.save(key, body["model_id"], body.get("path"), "sampler_weights", False, body.get("user_metadata"),
                        body.get("ttl_seconds"))
        if body.get("path") is None:  # save_weights_and_get_sampling_client: a session to sample these weights
            session = t.sampling_session(key, run_session(body["model_id"]), None, answer["path"])
            answer |= {"sampling_session_id": session["sampling_session_id"]}
        return answer | {"type": "save_weights_for_sampler"}

    return await future(request, key, "save_weights_for_sampler", saved, model_id=body["model_id"])


@router.post("/load_weights")
async def load_weights(request: Request, key: TinkerKey):
    body = await body_of(request, {"model_id", "seq_id", "session_id", "model_seq_id", "base_model",
                                   "user_metadata", "path", "optimizer", "optimizer_config", "weights_access_token"},
                         {"path", "optimizer"})
    check_optimizer(body.get("optimizer_config"))
    if body.get("weights_access_token"):
        raise APIError(400, "weights_access_token: checkpoints of another key cannot be loaded here",
                       param="weights_access_token", code="unsupported_parameter")
    t = tinker(request)
    if body.get("session_id") is not None:
        rid = run_name(body["session_id"], body.get("model_seq_id"))
        return await future(request, key, "load_weights", t.create_from, key, body["session_id"],
                      int(body.get("model_seq_id") or 0), body["path"], bool(body["optimizer"]),
                      body.get("base_model"), body.get("user_metadata"), model_id=rid)
    if body.get("model_id") is None:
        raise APIError(400, "Missing field 'model_id' (or session_id and model_seq_id).", param="model_id",
                       code="missing_required_parameter")
    return await future(request, key, "load_weights", t.load, key, body["model_id"], body["path"], bool(body["optimizer"]),
                  model_id=body["model_id"])


# --- sampling ------------------------------------------------------------------------------------------------------

SAMPLE_FIELDS = {"num_samples", "prompt", "sampling_params", "base_model", "model_path", "sampling_session_id",
                 "seq_id", "prompt_logprobs", "topk_prompt_logprobs", "topk_sample_logprobs", "record_stability_info"}
SAMPLE_NOT_SERVED = {"target_prompt_logprobs", "prompt_alt_tokens_k", "prompt_logprobs_last_n"}


@router.post("/create_sampling_session")
async def create_sampling_session(request: Request, key: TinkerKey):
    body = await body_of(request, {"session_id", "sampling_session_seq_id", "base_model", "model_path"},
                         {"session_id"})
    t = tinker(request)
    try:
        return await stored(request, key, t.sampling_session, key, str(body["session_id"]), body.get("base_model"),
                            body.get("model_path"))
    except TrainingError as exc:
        raise APIError(400, str(exc), code="invalid_value") from None


@router.post("/asample")
async def asample(request: Request, key: TinkerKey):
    body = await body_of(request, SAMPLE_FIELDS | SAMPLE_NOT_SERVED, {"prompt", "sampling_params"})
    for name in sorted(SAMPLE_NOT_SERVED & set(body)):
        if body[name] not in (None, 0, False):
            raise APIError(400, f"{name} is not supported here; send it unset", param=name,
                           code="unsupported_parameter")
    if body.get("topk_sample_logprobs"):
        raise APIError(400, "topk_sample_logprobs is not supported here; send 0 (each sampled token's own logprob "
                       "comes with it)", param="topk_sample_logprobs", code="unsupported_parameter")
    params = body["sampling_params"]
    check_known(params, {"max_tokens", "seed", "stop", "temperature", "top_k", "top_p"}, "sampling_params")
    t = tinker(request)
    sequences = new_id("seq")  # sequence i is "<sequences>:<i>" (recorded under it for stable_reinforce)
    answer = await future(request, key, "sample", t.sample, key, body, sequences, fusable=True)
    n = body.get("num_samples", 1)
    return answer | {"sample_sequence_ids": [f"{sequences}:{i}" for i in range(n if isinstance(n, int) else 1)]}


# --- futures -------------------------------------------------------------------------------------------------------

@router.post("/retrieve_future")
async def retrieve_future(request: Request, key: TinkerKey):
    body = await body_of(request, {"request_id", "allow_metadata_only"}, {"request_id"})
    pending = await tinker(request).futures.retrieve(body["request_id"], key)
    if pending is None:
        return {"type": "try_again", "request_id": body["request_id"], "queue_state": "active"}
    if pending.error is not None:
        return {"error": pending.error[0], "category": pending.error[1]}
    if isinstance(pending.answer, bytes):
        return Response(pending.answer, media_type=PROTO)
    return JSONResponse(pending.answer)


# --- runs and checkpoints ------------------------------------------------------------------------------------------

@router.get("/training_runs/{run_id}/checkpoints")
async def list_checkpoints(run_id: str, request: Request, key: TinkerKey):
    t = tinker(request)

    def listed() -> dict:
        t.run(key, run_id)
        return {"checkpoints": [t.checkpoint_object(c) for c in t.store.checkpoints(run_id, key)]}

    return await stored(request, key, listed)


async def paged(request: Request, key, field: str, fetch, shape, limit: int, offset: int) -> dict:
    """One page of a key's rows (``fetch(key, limit, offset)`` → rows and their count, in the store lane) under
    ``field``, with the SDK's cursor."""
    def page() -> dict:
        rows, total = fetch(key, max(0, min(limit, 1000)), max(0, offset))
        return {field: [shape(r) for r in rows], "cursor": {"offset": offset, "limit": limit, "total_count": total}}

    return await stored(request, key, page)


@router.get("/checkpoints")
async def all_checkpoints(request: Request, key: TinkerKey, limit: int = 100, offset: int = 0):
    t = tinker(request)
    return await paged(request, key, "checkpoints", t.store.checkpoints_page, t.checkpoint_object, limit, offset)


@router.get("/training_runs")
async def training_runs(request: Request, key: TinkerKey, limit: int = 20, offset: int = 0,
                        access_scope: str = "owned"):
    if access_scope not in ("owned", "accessible"):
        raise APIError(400, f"access_scope {access_scope!r}: send 'owned'", param="access_scope",
                       code="invalid_value")
    t = tinker(request)
    return await paged(request, key, "training_runs", t.store.list_runs, t.run_object, limit, offset)


@router.get("/training_runs/{run_id}")
async def training_run(run_id: str, request: Request, key: TinkerKey):
    t = tinker(request)

    return await stored(request, key, lambda: t.run_object(t.run(key, run_id)))


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
async def delete_checkpoint(run_id: str, checkpoint_id: str, request: Request, key: TinkerKey):
    t = tinker(request)
    return await stored(request, key, t.delete_checkpoint, key, f"tinker://{run_id}/{checkpoint_id}")


@router.post("/weights_info")
async def weights_info(request: Request, key: TinkerKey):
    body = await body_of(request, {"tinker_path"}, {"tinker_path"})
    t = tinker(request)

    def info() -> dict:
        try:
            ckpt = t.checkpoint(key, body["tinker_path"])
        except TrainingError as exc:
            raise APIError(400, str(exc), param="tinker_path", code="invalid_value") from None
        lora = t.store.get_run(ckpt["run_id"], key)["lora"]
        return {"base_model": t.base, "is_lora": True, "lora_rank": lora["rank"],
                "train_unembed": lora.get("train_unembed", True), "train_mlp": lora.get("train_mlp", True),
                "train_attn": lora.get("train_attn", True)}

    return await stored(request, key, info)


@router.get("/samplers/{sampler_id}")
async def sampler(sampler_id: str, request: Request, key: TinkerKey):
    t = tinker(request)
    session = await stored(request, key, t.session_of, key, sampler_id)
    return {"sampler_id": sampler_id, "base_model": t.base, "model_path": session["model_path"]}


@router.api_route("/{route:path}", methods=["GET", "POST", "PUT", "DELETE"])
async def not_served(route: str, request: Request, key: TinkerKey):
    """A route of the SDK this server does not serve (or no route at all): a 400 (404) saying so."""
    why = NOT_SERVED.get(route) or next((w for r, w in NOT_SERVED.items() if route.endswith(r)), None)
    if why is None:
        raise APIError(404, f"No Tinker route {request.method} /api/v1/{route} on this server.", code="not_found")
    raise APIError(400, f"/api/v1/{route} is not supported by this server: {why}.", code="unsupported_route")
