"""``/v1/embeddings`` over the encoders the project ships: all-MiniLM-L6-v2 (English, 384 dimensions) and
multilingual-e5-small (~100 languages, 384; each input embedded with e5's "query: " prefix). Vectors are unit
length (mean pooling + L2 norm), as float lists or base64 float32 (the client's default); usage counts the
encoder's tokens. The encoders run in worker processes at the lowest CPU priority
(:mod:`tunesmith.serve.api.embedding_worker`), each request in the embeddings lane as its key's work; an encoder
is loaded by a worker on its first request there and kept.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from tunesmith.serve.api.auth import Key
from tunesmith.serve.api.json_body import OffLoopJSON
from tunesmith.serve.errors import APIError
from tunesmith.serve.plan.fields import EMBEDDINGS, check_fields
from tunesmith.workers import LowPriorityWorkers, WorkerError

router = APIRouter(prefix="/v1", route_class=OffLoopJSON)
MAX_INPUTS = 2048  # as OpenAI
# the names scripts use for our encoders -> (encoder name, text prefix)
ENCODER_NAMES = {"all-minilm-l6-v2": ("all-minilm-l6-v2", ""), "all-MiniLM-L6-v2": ("all-minilm-l6-v2", ""),
                 "sentence-transformers/all-MiniLM-L6-v2": ("all-minilm-l6-v2", ""),
                 "multilingual-e5-small": ("multilingual-e5-small", "query: "),
                 "intfloat/multilingual-e5-small": ("multilingual-e5-small", "query: ")}
WORKERS = LowPriorityWorkers("tunesmith.serve.api.embedding_worker", 2)  # tunesmith.serve.api.embedding_worker


class EmbeddingBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # other fields: tunesmith.serve.plan.fields decides each
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: str = "float"
    dimensions: int | None = Field(None, ge=1)


def texts_of(body: EmbeddingBody) -> list[str]:
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts or len(texts) > MAX_INPUTS:
        raise APIError(400, f"input: give 1 to {MAX_INPUTS} texts, got {len(texts)}", param="input")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise APIError(400, "input: token arrays are not supported here; send the text", param="input",
                           code="unsupported_input")
        if not t:
            raise APIError(400, f"input[{i}]: an empty string cannot be embedded", param="input")
    return texts


def encoder_source(request: Request, model: str) -> tuple[str, str]:
    """The folder and text prefix of the encoder for ``model`` (a shipped name, or a name the server maps with
    --model-alias); a 404 naming the served ones otherwise."""
    settings = request.app.state.settings
    model = settings.model_aliases.get(model, model)
    folders = settings.embedding_models
    if folders is not None and model in folders:
        return str(folders[model]), ENCODER_NAMES.get(model, (model, ""))[1]
    if folders is None and model in ENCODER_NAMES:
        from tunesmith.models.encoders import encoder_folder

        name, prefix = ENCODER_NAMES[model]
        return encoder_folder(name), prefix
    known = sorted(folders) if folders is not None else sorted({n for n, _ in ENCODER_NAMES.values()})
    raise APIError(404, f"The embedding model '{model}' does not exist here. Available: {', '.join(known)}",
                   param="model", code="model_not_found")


def dimension(folder: str) -> int:
    """An encoder's embedding size, from its config (the encoder itself is loaded in the worker only)."""
    return int(json.loads((Path(folder) / "config.json").read_text())["hidden_size"])


@router.post("/embeddings")
async def create_embeddings(body: EmbeddingBody, request: Request, key: Key):
    check_fields(EMBEDDINGS, body)
    if body.encoding_format not in ("float", "base64"):
        raise APIError(400, f"encoding_format must be 'float' or 'base64', got '{body.encoding_format}'",
                       param="encoding_format")
    texts = texts_of(body)
    lane = request.app.state.lanes.embeddings
    folder, prefix = await lane.run(key, encoder_source, request, body.model)
    dim = dimension(folder)
    if body.dimensions is not None and body.dimensions != dim:
        raise APIError(400, f"dimensions: {body.model} gives {dim}-dimensional embeddings and cannot shorten "
                       "them; leave 'dimensions' out", param="dimensions", code="unsupported_parameter")
    try:
        answer = await lane.run(key, WORKERS.ask, {"folder": folder, "prefix": prefix, "texts": texts,
                                                  "model": body.model, "encoding_format": body.encoding_format})
    except WorkerError as exc:
        raise APIError(500, f"The embeddings could not be computed: {exc}", type_="server_error",
                       code="embedding_failed") from None
    return Response(answer, media_type="application/json")
