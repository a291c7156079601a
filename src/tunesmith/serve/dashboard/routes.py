"""The dashboard: one static page with its script and style (shipped in the package, no build step),
and the experiments of the runs folder as a small JSON API under ``/v1/runs`` (a tunesmith extension).

The page reads only this server's API with the key the user enters, so it sees exactly what that
key may see. Its Content-Security-Policy lets it reach no host but this server. The runs folder is read in the store
lane (:mod:`tunesmith.serve.api.store_lane`), never on the event loop.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from tunesmith.serve.api.auth import Key
from tunesmith.serve.api.json_body import OffLoopJSON
from tunesmith.serve.api.store_lane import in_store_lane
from tunesmith.serve.errors import APIError

# everything from this server; inline styles for the report's own <style>; charts embedded as data: PNGs
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
       "connect-src 'self'; frame-src 'self' blob: data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'self'")

router = APIRouter(prefix="/v1", route_class=OffLoopJSON)


def mount(app: FastAPI) -> None:
    """The page at ``/``, its assets at ``/static/``, the runs API at ``/v1/runs``."""
    app.include_router(router)
    app.mount("/static", StaticFiles(packages=[("tunesmith.serve.dashboard", "static")]), name="static")

    @app.get("/", include_in_schema=False)
    async def dashboard():
        page = resources.files("tunesmith.serve.dashboard").joinpath("static", "dashboard.html").read_text("utf-8")
        return HTMLResponse(page, headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"})


def _runs_dir(request: Request):
    return request.app.state.settings.runs_dir


def _run_folder(request: Request, run_id: str):
    from tunesmith.runs.folders import find_runs

    folder = find_runs(_runs_dir(request)).get(run_id)
    if folder is None:
        raise APIError(404, f"No run named '{run_id}' in the runs folder", param="run_id", code="not_found")
    return folder


@router.get("/runs")
@in_store_lane
def list_runs(request: Request, key: Key):
    """The experiments of the runs folder (``tunesmith serve --runs DIR``), newest first."""
    from tunesmith.runs.folders import list_runs as summaries

    return {"object": "list", "data": summaries(_runs_dir(request)), "has_more": False}


@router.get("/runs/{run_id}")
@in_store_lane
def retrieve_run(run_id: str, request: Request, key: Key):
    """One run's summary and its headline table (every contender on the headline metric)."""
    from tunesmith.runs.folders import run_summary

    return run_summary(run_id, _run_folder(request, run_id), with_table=True)


@router.get("/runs/{run_id}/report")
@in_store_lane
def run_report(run_id: str, request: Request, key: Key):
    """The run's report.html as ``tunesmith run`` wrote it (charts embedded)."""
    page = _run_folder(request, run_id) / "report.html"
    if not page.is_file():
        raise APIError(404, f"Run '{run_id}' has no report yet: it is written when the run finishes",
                       param="run_id", code="not_found")
    return Response(page.read_text(encoding="utf-8"), media_type="text/html",
                    headers={"Content-Security-Policy": CSP})
