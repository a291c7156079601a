"""The Tinker API's request bodies, one pydantic model a route: each field's JSON type and range as the ``tinker`` SDK
(0.38.0) sends it, every other field refused by name. A body is read once, where it enters (:func:`read`): a wrong
type, an unknown field, a number out of range or a non-finite float is a 400 naming the field (``lora_config.rank``,
``sampling_params.stop[2]``), never a server error after something ran.

The server's ids (sessions, runs, sampling sessions, futures) are checked here for their shape only (:data:`ID`):
whose they are is the service's check, against the store, before anything else runs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tunesmith.serve.errors import APIError, validation_error_body
from tunesmith.serve.tinker.store import NAME

SEQ_MAX = 2**31 - 1  # a client-made sequence number (model_seq_id, seq_id)
SEED_MAX = 2**63 - 1
METADATA_BYTES = 16 * 1024  # a run's or checkpoint's user_metadata, as JSON
STOPS = 4  # stop strings (or stop token ids: 64) of one sample call, as the OpenAI routes cap ``stop``
STOP_CHARS = 256  # one stop string
STOP_IDS = 64
TOPK_PROMPT = 20  # topk_prompt_logprobs, as the OpenAI routes cap top_logprobs
CHUNKS = 4096  # chunks of one prompt
SAMPLES = 64  # num_samples of one sample call (an RL group); its time is bounded by the server's pace besides

Seq = Annotated[int, Field(ge=0, le=SEQ_MAX)]
ID = Annotated[str, Field(min_length=1, max_length=128)]
Text = Annotated[str, Field(max_length=512)]


class Body(BaseModel):
    """A body of the Tinker API: strict JSON types (no ``"5"`` for 5, no ``1`` for true), finite floats, no field this
    server does not know."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, protected_namespaces=())


class Metadata(Body):
    """A body that may carry ``user_metadata``: a JSON object of at most :data:`METADATA_BYTES`."""

    user_metadata: dict[str, Any] | None = None

    @field_validator("user_metadata")
    @classmethod
    def _small(cls, value):
        import json

        if value is not None and len(json.dumps(value)) > METADATA_BYTES:
            raise ValueError(f"at most {METADATA_BYTES:,} bytes as JSON")
        return value


class Versioned(Body):
    type: Literal["client_config", "dynamic_config"] | None = None
    sdk_version: Text | None = None


class CreateSession(Metadata):
    type: Literal["create_session"] | None = None
    tags: list[Text] = Field(default_factory=list, max_length=64)
    sdk_version: Text | None = None
    project_id: Text | None = None
    display_name: Text | None = None


class SessionHeartbeat(Body):
    type: Literal["session_heartbeat"] | None = None
    session_id: ID


class FinishReason(Body):
    type: Text


class FinishSession(Body):
    reason: FinishReason | None = None
    detail: Annotated[str, Field(max_length=4096)] | None = None


class LoraConfig(Body):
    rank: Annotated[int, Field(ge=1, le=512)]
    seed: Annotated[int, Field(ge=0, le=SEED_MAX)] | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class OptimizerConfig(Body):
    type: Literal["adamw"] = "adamw"


class CreateModel(Metadata):
    type: Literal["create_model"] | None = None
    session_id: ID
    model_seq_id: Seq
    base_model: Text
    lora_config: LoraConfig | None = None
    optimizer_config: OptimizerConfig | None = None


class GetInfo(Body):
    type: Literal["get_info"] | None = None
    model_id: ID


class AdamParams(Body):
    learning_rate: Annotated[float, Field(ge=0, le=10)] = 1e-4
    beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    beta2: Annotated[float, Field(ge=0, lt=1)] = 0.95
    eps: Annotated[float, Field(ge=0, le=1)] = 1e-12
    weight_decay: Annotated[float, Field(ge=0, le=10)] = 0.0
    grad_clip_norm: Annotated[float, Field(ge=0)] = 0.0


class OptimStep(Body):
    type: Literal["optim_step"] | None = None
    model_id: ID
    seq_id: Seq | None = None
    adam_params: AdamParams = Field(default_factory=AdamParams)
    optimizer_params: dict | None = None


class Saving(Body):
    model_id: ID
    path: Annotated[str, Field(pattern=NAME.pattern + "$")] | None = None  # a checkpoint's name: a folder
    seq_id: Seq | None = None
    ttl_seconds: Annotated[int, Field(ge=3600, le=10 * 365 * 86400)] | None = None
    user_metadata: dict[str, Annotated[str, Field(max_length=4096)]] | None = Field(default=None, max_length=64)


class SaveWeights(Saving):
    type: Literal["save_weights"] | None = None
    overwrite: bool = False


class SaveWeightsForSampler(Saving):
    type: Literal["save_weights_for_sampler"] | None = None
    sampling_session_seq_id: Seq | None = None
    kind: Literal["snapshot"] = "snapshot"


class LoadWeights(Metadata):
    type: Literal["load_weights"] | None = None
    model_id: ID | None = None
    seq_id: Seq | None = None
    session_id: ID | None = None
    model_seq_id: Seq | None = None
    base_model: Text | None = None
    path: Text
    optimizer: bool
    optimizer_config: OptimizerConfig | None = None
    weights_access_token: Text | None = None


class CreateSamplingSession(Body):
    type: Literal["create_sampling_session"] | None = None
    session_id: ID
    sampling_session_seq_id: Seq
    base_model: Text | None = None
    model_path: Text | None = None


class Chunk(Body):
    type: Literal["encoded_text"] = "encoded_text"
    tokens: list[Annotated[int, Field(ge=0, le=SEQ_MAX)]]


class ModelInput(Body):
    chunks: list[Chunk] = Field(max_length=CHUNKS)


class SamplingParams(Body):
    max_tokens: Annotated[int, Field(ge=1, le=SEQ_MAX)] | None = None
    seed: Annotated[int, Field(ge=0, le=SEED_MAX)] | None = None
    stop: (Annotated[str, Field(min_length=1, max_length=STOP_CHARS)]
           | Annotated[list[Annotated[str, Field(min_length=1, max_length=STOP_CHARS)]], Field(max_length=STOPS)]
           | Annotated[list[Annotated[int, Field(ge=0, le=SEQ_MAX)]], Field(max_length=STOP_IDS)]
           | None) = None
    temperature: Annotated[float, Field(ge=0, le=100)] = 1.0
    top_k: Annotated[int, Field(ge=-1, le=SEQ_MAX)] = -1
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0


class Sample(Body):
    type: Literal["sample"] | None = None
    num_samples: Annotated[int, Field(ge=1, le=SAMPLES)] = 1
    prompt: ModelInput
    sampling_params: SamplingParams
    base_model: Text | None = None
    model_path: Text | None = None
    sampling_session_id: ID | None = None
    seq_id: Seq | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: Annotated[int, Field(ge=0, le=TOPK_PROMPT)] = 0
    topk_sample_logprobs: Literal[0] = 0
    record_stability_info: bool | None = None
    target_prompt_logprobs: None = None
    prompt_alt_tokens_k: Literal[0] = 0
    prompt_logprobs_last_n: None = None


class RetrieveFuture(Body):
    type: Literal["retrieve_future"] | None = None
    request_id: ID
    allow_metadata_only: bool = False


class WeightsInfo(Body):
    tinker_path: Text


class Telemetry(Body):
    """The SDK's reports of its own errors: only their list is read (each event's shape is the SDK's own)."""

    model_config = ConfigDict(extra="allow", strict=True)
    events: list[Any] = Field(default_factory=list, max_length=1000)


def read(model: type[Body], value) -> Body:
    """``value`` (the body's parsed JSON, already checked for what the store cannot hold by
    :func:`tunesmith.serve.api.json_body.parsed`; None: no body) as ``model``, or a 400 naming the first wrong
    field."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise APIError(400, "The body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        body = validation_error_body([{**e, "loc": tuple(e["loc"])} for e in errors])
        first = errors[0]
        code = "unrecognized_argument" if first["type"] == "extra_forbidden" else "invalid_value"
        message = body["message"]
        if code == "unrecognized_argument":
            message = (f"Unrecognized field {body['param']!r}: this server (the Tinker API of SDK 0.38.0) does not "
                       "honour it.")
        raise APIError(400, message, param=body["param"], code=code) from None
