"""``/v1/fine_tuning/alpha/graders/run`` and ``/validate``, answered as OpenAI answers them.

``run`` grades one ``model_sample`` against one ``item`` and returns the reward with OpenAI's metadata
(error flags, execution time, scores, token usage); a sample that cannot be graded gets reward 0 and the
reason in the flags, never an HTTP error. A bad grader is a 400 naming the field. A grader is checked in the store
lane (the models a key may name are read from the store) and run in the graders lane.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from tunesmith.graders import grade_batch
from tunesmith.serve.api.auth import Key
from tunesmith.serve.api.json_body import OffLoopJSON
from tunesmith.serve.api.store_lane import in_store_lane, stored
from tunesmith.serve.evals.grading import checked_grader, grading_context

router = APIRouter(prefix="/v1/fine_tuning/alpha/graders", route_class=OffLoopJSON)


class ValidateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    grader: dict


class RunBody(ValidateBody):
    model_sample: str
    item: Any = None


@router.post("/validate")
@in_store_lane
def validate(body: ValidateBody, request: Request, key: Key):
    return {"grader": checked_grader(request, key, body.grader)}


@router.post("/run")
async def run(body: RunBody, request: Request, key: Key):
    grader = await stored(request, key, checked_grader, request, key, body.grader)
    context = grading_context(request, key)
    [graded] = await request.app.state.lanes.graders.run(key, grade_batch, grader, [body.model_sample],
                                                         [body.item or {}], context)
    return {"reward": graded.reward, "metadata": graded.metadata, "sub_rewards": graded.sub_rewards,
            "model_grader_token_usage_per_model": graded.usage}
