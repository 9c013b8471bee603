"""`/v1/sweeps`: one run per grid point, their progress, and the verdict along depth."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from graddiag.service.api.data import require_cifar10
from graddiag.service.api.deps import SessionDep, SettingsDep, SweepIdDep
from graddiag.service.api.errors import documented
from graddiag.service.api.limits import server_caps
from graddiag.service.api.schemas import SweepIn
from graddiag.service.engine.report import FindingKind
from graddiag.service.store import sweeps as store
from graddiag.service.store.sweeps import SweepStatus, SweepSummary

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"], responses=documented(404, 409))
# `?finding=`: validated against the engine's kinds, so a misspelt kind is a 422 naming the allowed ones.
FindingFilter = Annotated[FindingKind | None, Query(description="Only what has a finding of this kind.")]


@router.post(
    "", status_code=202, response_model=SweepStatus, responses=documented(422, 503), summary="Submit a sweep"
)
def submit_sweep(
    body: SweepIn, request: Request, response: Response, session: SessionDep, settings: SettingsDep
) -> SweepStatus:
    """Queue one run per grid point; every point is validated (and capped) before any run is created."""
    caps, max_size = server_caps(settings), settings.max_sweep_size
    if "cifar10" in body.grid.get("dataset", [body.base.get("dataset", "cifar10")]):
        require_cifar10(request, settings)
    sweep = store.create_sweep(session, body.base, body.grid, caps=caps, max_size=max_size)
    response.headers["Location"] = str(request.app.url_path_for("get_sweep", sweep_id=sweep.id))
    return store.sweep_status(session, sweep.id)


@router.get("/{sweep_id}", response_model=SweepStatus, summary="Sweep progress")
def get_sweep(sweep_id: SweepIdDep, session: SessionDep, finding: FindingFilter = None) -> SweepStatus:
    """Counts by status and every run's grid values, status, verdict and findings (`finding`: only the runs
    with one of that kind; the counts stay the whole sweep's)."""
    return store.sweep_status(session, sweep_id, finding)


@router.get("/{sweep_id}/summary", response_model=SweepSummary, summary="Verdict along depth")
def get_sweep_summary(sweep_id: SweepIdDep, session: SessionDep, finding: FindingFilter = None) -> SweepSummary:
    """For each combination of the non-depth axes: the verdict and findings at every depth, the critical
    depth and where each finding first appears (`finding`: only the combinations that have one of that kind)."""
    return store.sweep_summary(session, sweep_id, finding)
