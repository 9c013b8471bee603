"""`/healthz` (the process answers) and `/readyz` (the database answers and runs will be executed).

Readiness of workers: the store has no worker registry (liveness lives in per-run leases, which say
nothing about idle workers), so the API judges only the worker processes it supervises itself —
`serve()` hands create_app a probe counting its live children. Without one (the API hosted alone,
or in-process in tests) workers are reported as not monitored and do not affect readiness.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from graddiag.service.api.data import cifar10_check, local_workers
from graddiag.service.api.deps import SessionDep, SettingsDep
from graddiag.service.api.schemas import Check, Health, Readiness
from graddiag.service.store.stats import check_schema

# (alive, configured) local worker processes.
WorkerProbe = Callable[[], tuple[int, int]]

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness")
def healthz() -> Health:
    """200 whenever the process can answer at all."""
    return Health()


def _database_check(session: SessionDep) -> Check:
    try:
        # Reading the runs table proves both the connection and that migrations have run.
        check_schema(session)
    except SQLAlchemyError as exc:
        return Check(ok=False, detail=f"database unavailable: {type(exc).__name__}")
    return Check(ok=True, detail="reachable, schema present")


def _workers_check(probe: WorkerProbe | None) -> Check:
    if probe is None:
        return Check(ok=True, detail="not monitored: workers run outside this process's supervision")
    alive, configured = probe()
    if configured == 0:
        return Check(ok=True, detail="no local workers configured; external workers are not monitored")
    return Check(ok=alive > 0, detail=f"{alive}/{configured} local worker processes alive")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready; the failing check says why."}},
    summary="Readiness",
)
def readyz(request: Request, session: SessionDep, settings: SettingsDep) -> JSONResponse:
    """200 when the database answers and, if this process supervises workers, one of them is alive; with
    whether CIFAR-10 is available to them (which does not decide readiness: synthetic runs need no data)."""
    database = _database_check(session)
    workers = _workers_check(request.app.state.worker_probe)
    ready = database.ok and workers.ok
    cifar10 = cifar10_check(settings, local_workers(request))
    body = Readiness(status="ready" if ready else "not_ready", database=database, workers=workers, cifar10=cifar10)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready else 503)
