"""OpenAI's Evals API over tunesmith's graders: ``/v1/evals`` (create, list, retrieve, update, delete) and
``/v1/evals/{id}/runs`` (create, list, retrieve, cancel, delete, output items).

An eval has a ``custom`` data source (the JSON schema of its items) and testing criteria, which are graders;
a run grades a ``jsonl`` source (rows given inline or as an uploaded file, each an item with an optional
sample) or a ``completions`` source (a served model answers each item from an ``input_messages`` template).
Runs execute in the background; poll the run until its status is ``completed``. Everything belongs to the
API key that created the eval: another key gets a 404, as for an id that does not exist. A key keeps at most
``--quota evals`` evals and ``--quota eval_runs`` runs; every ``metadata`` follows OpenAI's rule. The store's work
runs in the store lane (:mod:`tunesmith.serve.api.store_lane`), a run's rows in the files lane and its grading in the
evals lane: none on the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from tunesmith.serve.api.auth import Key
from tunesmith.serve.api.json_body import OffLoopJSON
from tunesmith.serve.api.objects import page
from tunesmith.serve.api.store_lane import in_store_lane, stored
from tunesmith.serve.errors import found
from tunesmith.serve.evals import resume
from tunesmith.serve.evals.check import MAX_CRITERIA, check_criteria, check_data_source, data_source_schema, run_rows
from tunesmith.serve.evals.store import EvalStore
from tunesmith.serve.store import new_id, quotas
from tunesmith.serve.store.claims import Claim
from tunesmith.serve.store.quotas import check_eval, check_eval_run, check_metadata
from tunesmith.serve.store.values import check_name

router = APIRouter(prefix="/v1/evals", route_class=OffLoopJSON)
Order = Literal["asc", "desc"]
NAME_CHARS = 256  # an eval's or a run's name


def _evals(request: Request) -> EvalStore:
    return EvalStore(request.app.state.store)


def eval_object(e: dict) -> dict:
    return {"id": e["id"], "object": "eval", "created_at": e["created_at"], "name": e["name"],
            "metadata": e["metadata"], "data_source_config": e["data_source_config"],
            "testing_criteria": e["testing_criteria"]}


def run_object(r: dict) -> dict:
    counts = r["result_counts"] or {"total": 0, "errored": 0, "failed": 0, "passed": 0}
    return {"id": r["id"], "object": "eval.run", "eval_id": r["eval_id"], "created_at": r["created_at"],
            "name": r["name"], "model": r["model"], "status": r["status"], "data_source": r["data_source"],
            "metadata": r["metadata"], "error": r["error"] or {"code": "", "message": ""},
            "result_counts": counts, "per_testing_criteria_results": r["per_testing_criteria_results"] or [],
            "per_model_usage": r["per_model_usage"] or [], "report_url": f"/v1/evals/{r['eval_id']}/runs/{r['id']}"}


def output_item_object(o: dict) -> dict:
    return {"id": o["id"], "object": "eval.run.output_item", "created_at": o["created_at"], "eval_id": o["eval_id"],
            "run_id": o["run_id"], "status": o["status"], "datasource_item_id": o["item_index"],
            "datasource_item": o["datasource_item"], "results": o["results"], "sample": o["sample"]}


# --- evals -------------------------------------------------------------------------------------------


class EvalBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    data_source_config: dict
    testing_criteria: list[dict] = Field(min_length=1, max_length=MAX_CRITERIA)
    name: str | None = None
    metadata: Any = None  # checked by check_metadata (OpenAI's rule)


class EvalUpdate(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str | None = None
    metadata: Any = None


def _eval(request: Request, key, eval_id: str) -> dict:
    return found(_evals(request).get_eval(eval_id, key), "eval", eval_id, "eval_id")


@router.post("")
@in_store_lane
def create_eval(body: EvalBody, request: Request, key: Key):
    check_metadata(body.metadata, "metadata")
    name = check_name(body.name, "name", NAME_CHARS) if body.name is not None else "eval"
    check_eval(request, key)
    config = data_source_schema(body.data_source_config)
    criteria = check_criteria(request, key, body.testing_criteria, body.data_source_config)
    with quotas.room(request.app.state.store, key):  # counted and created in one transaction under the key's lock
        check_eval(request, key)
        e = _evals(request).add_eval(key, name=name, data_source_config=config, testing_criteria=criteria,
                                     metadata=body.metadata)
    return eval_object(e)


@router.get("")
@in_store_lane
def list_evals(request: Request, key: Key, after: str | None = None, order: Order = "asc",
               limit: Annotated[int, Query(ge=1, le=100)] = 20,
               order_by: Literal["created_at", "updated_at"] = "created_at"):
    items, more = _evals(request).list_evals(key, order, order_by, after, limit)
    return page([eval_object(e) for e in items], more)


@router.get("/{eval_id}")
@in_store_lane
def retrieve_eval(eval_id: str, request: Request, key: Key):
    return eval_object(_eval(request, key, eval_id))


@router.post("/{eval_id}")
@in_store_lane
def update_eval(eval_id: str, body: EvalUpdate, request: Request, key: Key):
    _eval(request, key, eval_id)
    check_metadata(body.metadata, "metadata")
    if body.name is not None:
        check_name(body.name, "name", NAME_CHARS)
    changes = body.model_dump(exclude_unset=True)
    if changes:
        _evals(request).update_eval(eval_id, **changes)
    return eval_object(_eval(request, key, eval_id))


@router.delete("/{eval_id}")
@in_store_lane
def delete_eval(eval_id: str, request: Request, key: Key):
    _eval(request, key, eval_id)
    _evals(request).delete_eval(eval_id)
    return {"object": "eval.deleted", "deleted": True, "eval_id": eval_id}


# --- runs --------------------------------------------------------------------------------------------


class RunBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    data_source: dict[str, Any]
    name: str | None = None
    metadata: Any = None  # checked by check_metadata (OpenAI's rule)


def _run(request: Request, key, eval_id: str, run_id: str) -> dict:
    _eval(request, key, eval_id)
    return found(_evals(request).get_run(eval_id, run_id), "eval run", run_id, "run_id")


@router.post("/{eval_id}/runs")
async def create_run(eval_id: str, body: RunBody, request: Request, key: Key):
    e, source = await stored(request, key, checked_run, request, key, eval_id, body)
    if refused := request.app.state.lanes.evals.refusal(key):
        raise refused
    # a file or a selection of stored completions (up to 10,000 rows) is read and decoded off the event loop
    rows = await request.app.state.lanes.files.run(key, run_rows, request, key, source, e["data_source_config"])
    run = await asyncio.shield(started_run(request, key, e, body, source, rows))  # created, it starts: client or not
    return run_object(await stored(request, key, _evals(request).get_run, eval_id, run["id"]))


async def started_run(request: Request, key, e: dict, body: RunBody, source: dict, rows: list[dict]) -> dict:
    """The run created, its rows kept on the shared data folder and claimed by this replica (in the store lane), and
    started in a task of its own (:mod:`tunesmith.serve.evals.resume`: a replica that dies leaves it to another)."""
    model = source.get("model") or "(given samples)"
    run, claim = await stored(request, key, claimed_run, request, _evals(request), key, e["id"], body, model, source,
                              request.app.state.replica, rows)
    resume.start(request.app, key, e, run, rows, claim)
    return run


def checked_run(request: Request, key, eval_id: str, body: RunBody) -> tuple[dict, dict]:
    """(the eval, the run's data source checked): a 400 naming the field, a 429 when the key's quota of runs is
    full."""
    e = _eval(request, key, eval_id)
    check_metadata(body.metadata, "metadata")
    if body.name is not None:
        check_name(body.name, "name", NAME_CHARS)
    check_eval_run(request, key)
    check_criteria(request, key, e["testing_criteria"], e["data_source_config"])  # still allowed and served now
    return e, check_data_source(request, key, body.data_source)


def claimed_run(request: Request, store: EvalStore, key, eval_id: str, body: RunBody, model: str, source: dict,
                replica: str, rows: list[dict]) -> tuple[dict, Claim]:
    """The new run, its rows kept first where any replica reads them, then created claimed by this replica in one
    statement, counted in the key's quota in the transaction that creates it; with its claim."""
    rid = new_id("evalrun")
    resume.keep_rows(store.base.root, rid, rows)
    try:
        with quotas.room(store.base, key):
            check_eval_run(request, key)
            return store.add_run(key, eval_id, replica, rid, name=body.name or f"run on {model}", model=model,
                                 data_source=source, metadata=body.metadata)
    except BaseException:
        resume.rows_path(store.base.root, rid).unlink(missing_ok=True)
        raise


@router.get("/{eval_id}/runs")
@in_store_lane
def list_runs(eval_id: str, request: Request, key: Key, after: str | None = None, order: Order = "asc",
              limit: Annotated[int, Query(ge=1, le=100)] = 20, status: str | None = None):
    _eval(request, key, eval_id)
    items, more = _evals(request).list_runs(eval_id, order, status, after, limit)
    return page([run_object(r) for r in items], more)


@router.get("/{eval_id}/runs/{run_id}")
@in_store_lane
def retrieve_run(eval_id: str, run_id: str, request: Request, key: Key):
    return run_object(_run(request, key, eval_id, run_id))


@router.post("/{eval_id}/runs/{run_id}/cancel")
@in_store_lane
def cancel_run(eval_id: str, run_id: str, request: Request, key: Key):
    r = _run(request, key, eval_id, run_id)
    if r["status"] in ("queued", "in_progress"):
        _evals(request).update_run(run_id, status="canceled")
    return run_object(_run(request, key, eval_id, run_id))


@router.delete("/{eval_id}/runs/{run_id}")
@in_store_lane
def delete_run(eval_id: str, run_id: str, request: Request, key: Key):
    _run(request, key, eval_id, run_id)
    _evals(request).delete_run(run_id)
    return {"object": "eval.run.deleted", "deleted": True, "run_id": run_id}


@router.get("/{eval_id}/runs/{run_id}/output_items")
@in_store_lane
def list_output_items(eval_id: str, run_id: str, request: Request, key: Key, after: str | None = None,
                      order: Order = "asc", limit: Annotated[int, Query(ge=1, le=100)] = 20,
                      status: Literal["fail", "pass"] | None = None):
    _run(request, key, eval_id, run_id)
    items, more = _evals(request).output_items(run_id, order, status, after, limit)
    return page([output_item_object(o) for o in items], more)


@router.get("/{eval_id}/runs/{run_id}/output_items/{item_id}")
@in_store_lane
def retrieve_output_item(eval_id: str, run_id: str, item_id: str, request: Request, key: Key):
    _run(request, key, eval_id, run_id)
    return output_item_object(found(_evals(request).output_item(run_id, item_id), "output item", item_id,
                                    "output_item_id"))
