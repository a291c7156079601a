"""Distillation: a fine-tuning file made from this key's stored chat completions (``store: true``), selected by
metadata, model and time, so that the answers a strong model gave in production train a small one.

``POST /v1/files/from_stored_completions`` (a tunesmith route; ``tunesmith distill`` calls it) writes each selected
completion as an OpenAI chat fine-tuning example (the request's messages and tools, the answer; answers cut by
``max_tokens`` left out, and said), checks the file like any uploaded one and returns its File object, with the
number of examples and the models whose answers they are. The selection is one SQL query that reads no row past
``limit``, run in the files lane with the file's writing (never on the event loop); the file counts against the
key's file quotas like an upload.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from tunesmith.serve import quotas
from tunesmith.serve.api.auth import Key
from tunesmith.serve.api.json_body import OffLoopJSON
from tunesmith.serve.api.objects import file_object
from tunesmith.serve.api.stored_completions import MAX_TIME, CompletionStore, training_lines
from tunesmith.serve.engines.errors import APIError
from tunesmith.serve.jobs.routes import checked

router = APIRouter(prefix="/v1", route_class=OffLoopJSON)
MAX_EXAMPLES = 100_000


class DistillBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metadata: Any = None  # every pair must match (checked by OpenAI's metadata rule)
    model: str | None = None  # the model whose answers are taken
    created_after: int | None = Field(None, ge=0, le=MAX_TIME)  # Unix times in seconds
    created_before: int | None = Field(None, ge=0, le=MAX_TIME)
    limit: int | None = Field(None, ge=1, le=MAX_EXAMPLES)
    drop_system_messages: bool = False  # a system prompt the fine-tune is to learn by heart
    filename: str = Field("stored_completions.jsonl", min_length=1, max_length=256)


@router.post("/files/from_stored_completions")
async def file_from_stored_completions(body: DistillBody, request: Request, key: Key):
    wanted = quotas.check_metadata(body.metadata, "metadata")
    selected, examples, content, models = await request.app.state.lanes.files.run(
        key, selected_file, request.app.state.store, key, body, wanted)
    if not examples:
        raise APIError(400, f"no stored completion of this key matches ({selected} selected, {selected} of them cut by "
                       "max_tokens); store answers with store: true and metadata, then select them here",
                       param="metadata", code="no_stored_completions")
    quotas.check_file(request, key, len(content))
    await checked(request, key, "fine-tune", content, "metadata")
    made = request.app.state.store.add_file(key, body.filename, "fine-tune", content)
    return file_object(made) | {"examples": examples, "left_out_cut_by_max_tokens": selected - examples,
                                "models": dict(models.most_common())}


def selected_file(store, key, body: DistillBody, metadata: dict[str, str]) -> tuple[int, int, bytes, Counter]:
    """(completions selected, examples made, the JSONL file, the models whose answers they are), built in a lane's
    thread: a selection may hold 100,000 rows."""
    rows = CompletionStore(store).select(key, metadata, body.model, limit=body.limit or MAX_EXAMPLES,
                                         created_after=body.created_after, created_before=body.created_before)
    examples = training_lines(rows, body.drop_system_messages)
    content = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples).encode()
    return len(rows), len(examples), content, Counter(r["model"] for r in rows)
