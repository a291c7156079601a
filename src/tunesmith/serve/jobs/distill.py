"""Distillation: a fine-tuning file made from this key's stored chat completions (``store: true``), selected by
metadata, model and time, so that the answers a strong model gave in production train a small one.

``POST /v1/files/from_stored_completions`` (a tunesmith route; ``tunesmith distill`` calls it) writes each selected
completion as an OpenAI chat fine-tuning example (the request's messages and tools, the answer; answers cut by
``max_tokens`` left out, and said), checks the file like any uploaded one and returns its File object, with the
number of examples and the models whose answers they are.
"""

from __future__ import annotations

import json
from collections import Counter

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from tunesmith.serve.api.auth import Key
from tunesmith.serve.api.objects import file_object
from tunesmith.serve.api.stored_completions import CompletionStore, checked_metadata, training_lines
from tunesmith.serve.engines.errors import APIError
from tunesmith.serve.jobs.routes import checked

router = APIRouter(prefix="/v1")
MAX_EXAMPLES = 100_000


class DistillBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metadata: dict[str, str] | None = None  # every pair must match
    model: str | None = None  # the model whose answers are taken
    created_after: int | None = None
    created_before: int | None = None
    limit: int | None = Field(None, ge=1, le=MAX_EXAMPLES)
    drop_system_messages: bool = False  # a system prompt the fine-tune is to learn by heart
    filename: str = Field("stored_completions.jsonl", min_length=1, max_length=256)


@router.post("/files/from_stored_completions")
async def file_from_stored_completions(body: DistillBody, request: Request, key: Key):
    rows = CompletionStore(request.app.state.store).select(
        key, checked_metadata(body.metadata), body.model, limit=body.limit or MAX_EXAMPLES,
        created_after=body.created_after, created_before=body.created_before)
    examples = training_lines(rows, body.drop_system_messages)
    if not examples:
        cut = len(rows) - len(examples)
        raise APIError(400, f"no stored completion of this key matches ({len(rows)} selected, {cut} of them cut by "
                       "max_tokens); store answers with store: true and metadata, then select them here",
                       param="metadata", code="no_stored_completions")
    content = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples).encode()
    await checked(request, key, "fine-tune", content, "metadata")
    made = request.app.state.store.add_file(key, body.filename, "fine-tune", content)
    models = Counter(r["model"] for r in rows)
    return file_object(made) | {"examples": len(examples), "left_out_cut_by_max_tokens": len(rows) - len(examples),
                                "models": dict(models.most_common())}
