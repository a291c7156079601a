"""Distillation: a fine-tuning file made from this key's stored chat completions (``store: true``), selected by
metadata, model and time, so that the answers a strong model gave in production train a small one.

``POST /v1/files/from_stored_completions`` (a tunesmith route; ``tunesmith distill`` calls it) writes each selected
completion as an OpenAI chat fine-tuning example (the request's messages and tools, the answer; answers cut by
``max_tokens`` and empty answers left out, counted by reason), checks the file like any uploaded one and returns its
File object, with the number of examples and the models whose answers they are. The selection is read a page of rows
at a time and each example checked and written as its line, in the files lane (never on the event loop), so that
memory holds one page whatever the selection's size; the file is kept in the store lane and counts against the key's
file quotas like an upload.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from tunesmith.data.formats.chat import check_example
from tunesmith.data.formats.validate import Validation, upload_problems
from tunesmith.serve.api.auth import Key
from tunesmith.serve.api.json_body import OffLoopJSON
from tunesmith.serve.api.objects import file_object
from tunesmith.serve.api.store_lane import stored
from tunesmith.serve.api.stored_completions import MAX_TIME, CompletionStore, left_out, training_example
from tunesmith.serve.errors import APIError
from tunesmith.serve.jobs.routes import kept_file
from tunesmith.serve.store import quotas

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
    made = await request.app.state.lanes.files.run(key, written_file, request.app.state.store, key, body, wanted)
    try:
        if not made.examples:
            raise APIError(400, f"no stored completion of this key matches ({made.selected} selected, "
                           f"{made.left_out['cut_by_max_tokens']} of them cut by max_tokens, {made.left_out['empty']} "
                           "empty); store answers with store: true and metadata, then select them here",
                           param="metadata", code="no_stored_completions")
        await stored(request, key, quotas.check_file, request, key, made.bytes)
        if made.problems:
            raise APIError(400, "Invalid fine-tuning file: " + "; ".join(made.problems), param="metadata",
                           code="invalid_file_format")
        kept = await stored(request, key, kept_file, request, key, body.filename, "fine-tune", made.path, None)
    finally:
        made.path.unlink(missing_ok=True)  # kept: moved into the store; refused: not kept
    return file_object(kept) | {"examples": made.examples,
                                "left_out_cut_by_max_tokens": made.left_out["cut_by_max_tokens"],
                                "left_out_empty": made.left_out["empty"], "models": dict(made.models.most_common())}


@dataclass
class Distilled:
    """A fine-tuning file written from stored completions in the store's folder, not yet kept: how many were
    selected and became examples, the models whose answers they are and the file's problems (as an upload's)."""

    path: Path
    selected: int = 0
    examples: int = 0
    bytes: int = 0
    models: Counter = field(default_factory=Counter)
    left_out: Counter = field(default_factory=Counter)  # by reason (stored_completions.left_out)
    problems: list[str] = field(default_factory=list)


def written_file(store, key, body: DistillBody, metadata: dict[str, str]) -> Distilled:
    """The selected completions as a JSONL file, in a lane's thread: a selection may hold 100,000 rows, so they are
    read a page at a time (:meth:`CompletionStore.walk`) and each example is checked as an uploaded fine-tuning
    file's lines are (:func:`check_example`) and written as its line; memory holds one page, never the file."""
    made = Distilled(store.root / "files" / f"distilling-{secrets.token_hex(16)}.jsonl")
    checks = Validation(made.path)
    rows = CompletionStore(store).walk(key, metadata, body.model, limit=body.limit or MAX_EXAMPLES,
                                       created_after=body.created_after, created_before=body.created_before)
    try:
        with made.path.open("w", encoding="utf-8") as out:
            for row in rows:
                made.selected += 1
                made.models[row["model"]] += 1
                why = left_out(row)
                if why is not None:
                    made.left_out[why] += 1
                    continue
                example = training_example(row, body.drop_system_messages)
                made.examples += 1
                for kind in check_example(example):
                    checks.error(kind, made.examples)
                out.write(json.dumps(example, ensure_ascii=False) + "\n")
    except BaseException:
        made.path.unlink(missing_ok=True)
        raise
    made.bytes, made.problems = made.path.stat().st_size, upload_problems(checks)
    return made
