"""``/v1/embeddings`` computed in a worker process at the lowest CPU priority (:mod:`tunesmith.workers`): an encoder
over 2,048 texts is seconds of every core, and in the server's own process it took the CPU the engine's decoding
needs for every key. The worker keeps each encoder it loaded and writes the whole answer (megabytes of JSON) itself;
the server passes the bytes on."""

from __future__ import annotations

import base64
import json

from tunesmith.workers import serve_lines

_encoders: dict[tuple[str, str], object] = {}


def answer(request: dict) -> bytes:
    """OpenAI's embeddings answer for ``{"folder", "prefix", "texts", "model", "encoding_format"}``, as JSON."""
    from tunesmith.models.embeddings import SentenceEncoder

    key = (request["folder"], request["prefix"])
    if key not in _encoders:
        _encoders[key] = SentenceEncoder(request["folder"], request["prefix"])
    vectors, tokens = _encoders[key].encode(request["texts"])
    as_base64 = request["encoding_format"] == "base64"
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if as_base64 else v.tolist()}
            for i, v in enumerate(vectors)]
    doc = {"object": "list", "data": data, "model": request["model"],
           "usage": {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)}}
    return json.dumps(doc, separators=(",", ":")).encode()


if __name__ == "__main__":
    serve_lines(answer)
