"""The Tinker API's routes (``/api/v1/...``, the wire of the ``tinker`` SDK 0.38.0), so that
``tinker.ServiceClient(base_url=<server>, api_key="tml-<key>")`` trains and samples here unchanged.

Each route reads its body as the SDK sends it (JSON, read as every route of the API reads it, then checked against
its schema in :mod:`tunesmith.serve.tinker.bodies`; forward_backward in protobuf, :mod:`tunesmith.serve.tinker.wire`):
a field it does not know, a wrong type or a value out of range is a 400 naming it. Every id a call names (a session,
a run, a sampling session, a future, a checkpoint) is the server's own and checked against the key before anything
runs: another key's is not found, as an unknown one. Training and sampling calls answer a future at once;
``retrieve_future`` returns its answer. Routes the SDK has that this server does not serve answer 400 naming the
route and what to do instead."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from tunesmith.serve.api.auth import TinkerKey, engine_for
from tunesmith.serve.api.json_body import OffLoopJSON, parsed
from tunesmith.serve.api.store_lane import stored
from tunesmith.serve.errors import APIError
from tunesmith.serve.store import new_id
from tunesmith.serve.tinker import bodies, sampling, wire
from tunesmith.serve.tinker.losses import TrainingError
from tunesmith.serve.tinker.service import Tinker
from tunesmith.serve.tinker.store import RUN_ID, run_name

log = logging.getLogger("tunesmith.serve")
router = APIRouter(prefix="/api/v1", route_class=OffLoopJSON)
PAGE = 1000  # rows of one page of a list
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


async def body_of(request: Request, model: type[bodies.Body]):
    """The body the SDK sent, as ``model`` (:func:`bodies.read`: a 400 naming the first wrong field). A JSON body was
    parsed and checked before the route ran (:class:`OffLoopJSON`); one sent under another content type is read
    here the same way."""
    if not hasattr(request, "_json"):
        raw = await request.body()
        request._json = parsed(raw) if raw.strip() else None
    return bodies.read(model, request._json)


def run_id_of(value: str) -> str:
    """A training run's id as a path or a body names it: one the server makes, or a 404 (no other string is
    looked up)."""
    if not RUN_ID.fullmatch(value):
        raise APIError(404, f"No training run {value[:64]!r} for this key.", code="not_found")
    return value


async def future(request: Request, key, kind: str, fn, *args, model_id: str | None = None,
                 fusable: bool = False) -> dict:
    """``fn(*args)`` queued as the key's call (in the order calls arrive), its future's row written in the store
    before its id is answered."""
    futures = tinker(request).futures
    rid = futures.submit(key, kind, fn, *args, fusable=fusable)
    await futures.recorded(rid)
    return {"request_id": rid, "model_id": model_id}


async def command(request: Request, key, kind: str, value: str, seq: int | None, *args, body: bytes | None = None):
    """A call on the key's run ``value`` (checked as the key's first): with replicas, written to the run's command log
    and applied by the replica holding the run, in the SDK's ``seq_id`` order (:mod:`tunesmith.serve.tinker.commands`);
    on one server, queued here."""
    t = tinker(request)
    run_id = run_id_of(value)
    await stored(request, key, t.callable_run, key, run_id)
    if t.commands is not None:
        return {"request_id": await t.commands.log(key, run_id, seq, kind, list(args), body), "model_id": run_id}
    fn, call = t.call_of(kind, key, run_id, list(args), body)
    return await future(request, key, kind, fn, *call, model_id=run_id, fusable=kind == "forward_backward")


# --- the service ---------------------------------------------------------------------------------------------------

@router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@router.post("/client/config")
async def client_config(request: Request, key: TinkerKey):
    await body_of(request, bodies.Versioned)
    return CLIENT_CONFIG


@router.post("/client/dynamic_config")
async def dynamic_config(request: Request, key: TinkerKey):
    await body_of(request, bodies.Versioned)
    return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}


@router.get("/get_server_capabilities")
async def capabilities(request: Request, key: TinkerKey):
    engine = request.app.state.engine
    return {"supported_models": [{"model_name": tinker(request).base, "trainable": True, "sampleable": True,
                                  "max_context_length": getattr(engine, "context_length", None)}]}


@router.post("/create_session")
async def create_session(request: Request, key: TinkerKey):
    """A client session, made and kept here as the key's: the only session its runs and samplers are made in."""
    await body_of(request, bodies.CreateSession)
    t = tinker(request)
    return await stored(request, key, t.create_session, key)


@router.post("/session_heartbeat")
async def session_heartbeat(request: Request, key: TinkerKey):
    body = await body_of(request, bodies.SessionHeartbeat)
    t = tinker(request)
    await stored(request, key, t.own_session, key, body.session_id)  # 410 once finished: the SDK's loop stops
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
async def finish_session(session_id: str, request: Request, key: TinkerKey):
    """A client's session ended (``ServiceClient.close``): it takes no new run, and the training runs it made on this
    replica are let go (their rows and checkpoints stay; a new client loads a saved state)."""
    await body_of(request, bodies.FinishSession)
    t = tinker(request)
    await stored(request, key, t.own_session, key, session_id, False)
    await t.futures.lane.run(key, t.finish_session, key, session_id, always=True)  # after the key's calls queued
    return {}


@router.post("/telemetry")
async def telemetry(request: Request, key: TinkerKey):
    """The SDK's reports of its own errors: each exception it reports is a line of this server's log (where an
    operator sees a client's failures); the rest are counted. ``TINKER_TELEMETRY=0`` on the client stops them."""
    events = (await body_of(request, bodies.Telemetry)).events
    for event in events:
        if isinstance(event, dict) and event.get("event") in ("UNHANDLED_EXCEPTION", "unhandled_exception"):
            log.warning("Tinker client of key %s reported: %s", (key or "-")[:12], str(event)[:500])
    log.debug("Tinker client telemetry: %d events", len(events))
    return {"status": "accepted"}


# --- training ------------------------------------------------------------------------------------------------------

@router.post("/create_model")
async def create_model(request: Request, key: TinkerKey):
    body = await body_of(request, bodies.CreateModel)
    lora = body.lora_config.model_dump() if body.lora_config else {"rank": 32}
    t = tinker(request)
    await stored(request, key, t.own_session, key, body.session_id)  # before anything is queued: 404 or 410
    return await future(request, key, "create_model", t.create_model, key, body.session_id, body.model_seq_id,
                        body.base_model, lora, body.user_metadata)


@router.post("/get_info")
async def get_info(request: Request, key: TinkerKey):
    body = await body_of(request, bodies.GetInfo)
    return await stored(request, key, tinker(request).info, key, run_id_of(body.model_id))


@router.post("/forward_backward")
async def forward_backward(request: Request, key: TinkerKey):
    if PROTO not in request.headers.get("content-type", ""):
        raise APIError(400, f"forward_backward takes a protobuf body ({PROTO}), as the SDK sends it.",
                       code="invalid_content_type")
    if request.headers.get("content-encoding", "identity") != "identity":
        raise APIError(400, "Send forward_backward uncompressed (this server's client config says so).",
                       code="unsupported_encoding")
    body = await request.body()
    run_id, seq = wire.run_and_seq(body)
    return await command(request, key, "forward_backward", run_id, seq, body=body)


@router.post("/optim_step")
async def optim_step(request: Request, key: TinkerKey):
    body = await body_of(request, bodies.OptimStep)
    if body.optimizer_params is not None:
        raise APIError(400, "optimizer_params (a non-Adam optimizer) is not supported here; send adam_params",
                       param="optimizer_params", code="unsupported_value")
    return await command(request, key, "optim_step", body.model_id, body.seq_id, body.adam_params.model_dump())


@router.post("/save_weights")
async def save_weights(request: Request, key: TinkerKey):
    body = await body_of(request, bodies.SaveWeights)
    return await command(request, key, "save_weights", body.model_id, body.seq_id, body.path, body.overwrite,
                         body.user_metadata, body.ttl_seconds)


@router.post("/save_weights_for_sampler")
async def save_weights_for_sampler(request: Request, key: TinkerKey):
    body = await body_of(request, bodies.SaveWeightsForSampler)
    return await command(request, key, "save_weights_for_sampler", body.model_id, body.seq_id, body.path,
                         body.user_metadata, body.ttl_seconds)


@router.post("/load_weights")
async def load_weights(request: Request, key: TinkerKey):
    body = await body_of(request, bodies.LoadWeights)
    if body.weights_access_token:
        raise APIError(400, "weights_access_token: checkpoints of another key cannot be loaded here",
                       param="weights_access_token", code="unsupported_parameter")
    t = tinker(request)
    if body.session_id is not None:
        await stored(request, key, t.own_session, key, body.session_id)  # before anything is queued: 404 or 410
        seq = body.model_seq_id or 0
        return await future(request, key, "load_weights", t.create_from, key, body.session_id, seq, body.path,
                            body.optimizer, body.base_model, body.user_metadata,
                            model_id=run_name(body.session_id, seq))
    if body.model_id is None:
        raise APIError(400, "Missing field 'model_id' (or session_id and model_seq_id).", param="model_id",
                       code="missing_required_parameter")
    return await command(request, key, "load_weights", body.model_id, body.seq_id, body.path, body.optimizer)


# --- sampling ------------------------------------------------------------------------------------------------------

@router.post("/create_sampling_session")
async def create_sampling_session(request: Request, key: TinkerKey):
    body = await body_of(request, bodies.CreateSamplingSession)
    t = tinker(request)
    return await stored(request, key, t.sampling_session, key, body.session_id, body.base_model, body.model_path)


@router.post("/asample")
async def asample(request: Request, key: TinkerKey):
    """A sample as rows of the server's inference engine, the key's (:mod:`tunesmith.serve.tinker.sampling`): its
    weights checked as the key's and loaded, its place among the key's requests taken (a 429 past its limit) and its
    tokens charged, all before its future is answered."""
    body = (await body_of(request, bodies.Sample)).model_dump(exclude_none=True)
    t, app = tinker(request), request.app
    want = await app.state.lanes.plan.run(key, sampling.read_want, t, key, body)
    engine = await engine_for(request, want.model, key)  # a sampler checkpoint loaded by its path, as chat loads it
    ticket = await app.state.limiter.admitted(key)
    sequences_id = new_id("seq")  # sequence i is "<sequences_id>:<i>" (recorded under it for stable_reinforce)

    async def sampled() -> bytes:
        try:
            generations = await sampling.submit(engine, want, key).results()
        finally:
            ticket.release()
        sequences = sampling.sequences(generations)
        await app.state.lanes.store.run(key, t.record_samples, key, body, sequences_id, want, sequences, always=True)
        return wire.sample_response(sequences, *sampling.prompt_scores(want, generations[0]))

    try:
        await ticket.charged(want.cost)
        rid = t.futures.start(key, "sample", sampled)
    except BaseException:
        ticket.release()
        raise
    await t.futures.recorded(rid)
    return {"request_id": rid, "model_id": None, "sample_sequence_ids": [f"{sequences_id}:{i}"
                                                                         for i in range(want.n)]}


# --- futures -------------------------------------------------------------------------------------------------------

@router.post("/retrieve_future")
async def retrieve_future(request: Request, key: TinkerKey):
    body = await body_of(request, bodies.RetrieveFuture)
    pending = await tinker(request).futures.retrieve(body.request_id, key)
    if pending is None:
        return {"type": "try_again", "request_id": body.request_id, "queue_state": "active"}
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
        t.run(key, run_id_of(run_id))
        return {"checkpoints": [t.checkpoint_object(c) for c in t.store.checkpoints(run_id, key)]}

    return await stored(request, key, listed)


async def paged(request: Request, key, field: str, fetch, shape, limit: int, offset: int) -> dict:
    """One page of a key's rows (``fetch(key, limit, offset)`` → rows and their count, in the store lane) under
    ``field``, with the SDK's cursor."""
    def page() -> dict:
        rows, total = fetch(key, limit, offset)
        return {field: [shape(r) for r in rows], "cursor": {"offset": offset, "limit": limit, "total_count": total}}

    return await stored(request, key, page)


@router.get("/checkpoints")
async def all_checkpoints(request: Request, key: TinkerKey, limit: int = Query(100, ge=0, le=PAGE),
                          offset: int = Query(0, ge=0, le=2**31 - 1)):
    t = tinker(request)
    return await paged(request, key, "checkpoints", t.store.checkpoints_page, t.checkpoint_object, limit, offset)


@router.get("/training_runs")
async def training_runs(request: Request, key: TinkerKey, limit: int = Query(20, ge=0, le=PAGE),
                        offset: int = Query(0, ge=0, le=2**31 - 1), access_scope: str = "owned"):
    if access_scope not in ("owned", "accessible"):
        raise APIError(400, f"access_scope {access_scope[:40]!r}: send 'owned'", param="access_scope",
                       code="invalid_value")
    t = tinker(request)
    return await paged(request, key, "training_runs", t.store.list_runs, t.run_object, limit, offset)


@router.get("/training_runs/{run_id}")
async def training_run(run_id: str, request: Request, key: TinkerKey):
    t = tinker(request)

    return await stored(request, key, lambda: t.run_object(t.run(key, run_id_of(run_id))))


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
async def delete_checkpoint(run_id: str, checkpoint_id: str, request: Request, key: TinkerKey):
    t = tinker(request)
    return await stored(request, key, t.delete_checkpoint, key, f"tinker://{run_id_of(run_id)}/{checkpoint_id}")


@router.post("/weights_info")
async def weights_info(request: Request, key: TinkerKey):
    body = await body_of(request, bodies.WeightsInfo)
    t = tinker(request)

    def info() -> dict:
        try:
            ckpt = t.checkpoint(key, body.tinker_path)
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
