"""``/v1/embeddings`` over the encoders the project ships: all-MiniLM-L6-v2 (English, 384 dimensions) and
multilingual-e5-small (~100 languages, 384; each input embedded with e5's "query: " prefix). Vectors are unit
length (mean pooling + L2 norm), as float lists or base64 float32 (the client's default); usage counts the
encoder's tokens. An encoder is loaded on its first request and kept.
"""

from __future__ import annotations

import base64
import json
import threading

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from tunesmith.serve.api.auth import Key
from tunesmith.serve.engines.errors import APIError
from tunesmith.serve.plan.fields import EMBEDDINGS, check_fields

router = APIRouter(prefix="/v1")
MAX_INPUTS = 2048  # as OpenAI
# the names scripts use for our encoders -> (encoder name, text prefix)
ENCODER_NAMES = {"all-minilm-l6-v2": ("all-minilm-l6-v2", ""), "all-MiniLM-L6-v2": ("all-minilm-l6-v2", ""),
                 "sentence-transformers/all-MiniLM-L6-v2": ("all-minilm-l6-v2", ""),
                 "multilingual-e5-small": ("multilingual-e5-small", "query: "),
                 "intfloat/multilingual-e5-small": ("multilingual-e5-small", "query: ")}
_LOADING = threading.Lock()


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


def encoder(request: Request, model: str):
    """The loaded encoder for ``model`` (a shipped name, or a name the server maps with --model-alias)."""
    settings = request.app.state.settings
    model = settings.model_aliases.get(model, model)
    folders = settings.embedding_models
    if folders is not None and model in folders:
        name, prefix, folder = model, ENCODER_NAMES.get(model, (model, ""))[1], folders[model]
    elif folders is None and model in ENCODER_NAMES:
        name, prefix = ENCODER_NAMES[model]
        folder = None
    else:
        known = sorted(folders) if folders is not None else sorted({n for n, _ in ENCODER_NAMES.values()})
        raise APIError(404, f"The embedding model '{model}' does not exist here. Available: {', '.join(known)}",
                       param="model", code="model_not_found")
    cache = request.app.state.encoders
    with _LOADING:
        if name not in cache:
            from tunesmith.models.embeddings import SentenceEncoder
            from tunesmith.models.encoders import encoder_folder

            cache[name] = SentenceEncoder(folder or encoder_folder(name), prefix)
    return cache[name]


@router.post("/embeddings")
async def create_embeddings(body: EmbeddingBody, request: Request, key: Key):
    check_fields(EMBEDDINGS, body)
    if body.encoding_format not in ("float", "base64"):
        raise APIError(400, f"encoding_format must be 'float' or 'base64', got '{body.encoding_format}'",
                       param="encoding_format")
    texts = texts_of(body)
    lane = request.app.state.lanes.embeddings
    enc = await lane.run(key, encoder, request, body.model)
    if body.dimensions is not None and body.dimensions != enc.dim:
        raise APIError(400, f"dimensions: {body.model} gives {enc.dim}-dimensional embeddings and cannot shorten "
                       "them; leave 'dimensions' out", param="dimensions", code="unsupported_parameter")
    return Response(await lane.run(key, answer, enc, texts, body.model, body.encoding_format),
                    media_type="application/json")


def answer(enc, texts: list[str], model: str, encoding_format: str) -> bytes:
    """The embeddings answer as JSON bytes, built in the lane's thread: 2,048 vectors are megabytes of JSON, which
    the event loop must not spend its time writing."""
    vectors, tokens = enc.encode(texts)
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if encoding_format == "base64"
             else v.tolist()} for i, v in enumerate(vectors)]
    doc = {"object": "list", "data": data, "model": model,
           "usage": {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)}}
    return json.dumps(doc, separators=(",", ":")).encode()
