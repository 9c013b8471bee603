"""`/v1/sweeps`: one run per grid point, their progress, and the verdict along depth (and, for recurrent
nets, through time)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from graddiag.service.api.data import require_cifar10
from graddiag.service.api.deps import SessionDep, SettingsDep, SweepIdDep
from graddiag.service.api.errors import documented
from graddiag.service.api.limits import check_page_size, server_caps
from graddiag.service.api.schemas import SweepIn
from graddiag.service.engine.report import FindingKind
from graddiag.service.store import labels as label_store
from graddiag.service.store import sweeps as store
from graddiag.service.store.labels import Labels
from graddiag.service.store.sweeps import SweepList, SweepStatus, SweepSummary

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"], responses=documented(404, 409))
# `?finding=`: validated against the engine's kinds, so a misspelt kind is a 422 naming the allowed ones.
FindingFilter = Annotated[FindingKind | None, Query(description="Only what has a finding of this kind.")]


@router.post("", status_code=202, response_model=SweepStatus, responses=documented(422, 503), summary="Submit a sweep")
def submit_sweep(
    body: SweepIn, request: Request, response: Response, session: SessionDep, settings: SettingsDep
) -> SweepStatus:
    """Queue one run per grid point; every point is validated (and capped) before any run is created."""
    caps, max_size = server_caps(settings), settings.max_sweep_size
    if "cifar10" in body.grid.get("dataset", [body.base.get("dataset", "cifar10")]):
        require_cifar10(request, settings)
    sweep = store.create_sweep(
        session, body.base, body.grid, caps=caps, max_size=max_size, name=body.name, tags=body.tags
    )
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
    depth and where each finding first appears (`finding`: only the combinations that have one of that kind);
    for recurrent runs the decades per time step and the critical sequence length 2 / |slope| at every depth,
    and per recurrent arch the shortest."""
    return store.sweep_summary(session, sweep_id, finding)


@router.get("", response_model=SweepList, summary="List sweeps")
def list_sweeps(
    session: SessionDep,
    settings: SettingsDep,
    name: Annotated[str | None, Query(max_length=200, description="Only sweeps whose name contains this.")] = None,
    tag: Annotated[list[str] | None, Query(max_length=20, description="Only sweeps with this tag; repeatable.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
) -> SweepList:
    """Sweeps, newest first: name, tags, base spec, grid, progress and each configuration's critical depth."""
    check_page_size(limit, settings)
    return store.list_sweeps(session, limit=limit, offset=offset, name=name, tags=tag)


@router.patch("/{sweep_id}", response_model=SweepStatus, responses=documented(422), summary="Name or tag a sweep")
def label_sweep(sweep_id: SweepIdDep, labels: Labels, session: SessionDep) -> SweepStatus:
    """Set the sweep's `name` and/or `tags` (a field left out stays as it is; `name: ""` clears it)."""
    label_store.label_sweep(session, sweep_id, labels)
    return store.sweep_status(session, sweep_id)
