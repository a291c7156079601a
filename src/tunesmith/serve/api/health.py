"""``GET /health`` and ``GET /ready``: what a load balancer probes, without a key (they say nothing of any key).

``/health`` is 200 while the process serves HTTP (a liveness probe: restart it when this fails). ``/ready`` is 200
only when this replica can answer requests now: its engine is up (vLLM not restarting) and its store takes a write
within two seconds (the replica's row of ``replicas``: a database that answers reads but cannot write, or whose rows
are locked, is not ready); otherwise 503 with what is wrong, so that the balancer sends traffic elsewhere while a
replica starts, drains, or has lost its database.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from tunesmith.serve.store.database import NOW

router = APIRouter()
STORE_WAIT_S = 2.0


@router.get("/health", include_in_schema=False)
async def health():
    return {"status": "ok"}


@router.get("/ready", include_in_schema=False)
async def ready(request: Request):
    state, problems = request.app.state, []
    engine = getattr(state, "engine", None)
    server = getattr(engine, "server", None)  # vLLM's process; the built-in engine has none
    if engine is None or getattr(engine, "closed", False):
        problems.append("the engine is not running")
    elif server is not None and not server.ready.is_set():
        problems.append("vLLM is starting or restarting")
    try:
        await asyncio.wait_for(asyncio.to_thread(wrote, state.store.db, getattr(state, "replica", "")), STORE_WAIT_S)
    except Exception as exc:  # noqa: BLE001 - any failure to reach the store is a reason not to send traffic
        problems.append(f"the store did not answer ({type(exc).__name__})")
    if problems:
        return JSONResponse({"status": "not ready", "problems": problems}, status_code=503)
    return {"status": "ready", "database": state.store.db.kind}


def wrote(db, replica: str) -> None:
    """This replica's row of ``replicas`` written (when it was last ready, in the database's clock)."""
    db.execute(f"INSERT INTO replicas VALUES (?, {NOW}) ON CONFLICT (id) DO UPDATE SET seen = excluded.seen",
               (replica,))
