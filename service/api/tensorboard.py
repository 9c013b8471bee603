"""`GET /v1/runs/{id}/tensorboard`: a succeeded run's TensorBoard events as a tar.gz.

The worker-written events (with gradient histograms) when the run was probed with TensorBoard on,
otherwise events built now from the stored report (scalars and text, no histograms). Unpacked into a
log root (``tar xzf run.tar.gz -C logs``) the archive is one TensorBoard run named after the run id.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Final, Literal

from fastapi import APIRouter, Response
from sqlalchemy.orm import Session

from graddiag.service.api.deps import SessionDep, SettingsDep
from graddiag.service.api.errors import ApiProblem, documented
from graddiag.service.settings import Settings
from graddiag.service.store import runs as store
from graddiag.service.store.runs import RunNotFound

EXTRA: Final = "graddiag[tensorboard]"
MEDIA_TYPE: Final = "application/gzip"
# Response header saying where the events came from: "worker" (with histograms) or "report".
SOURCE_HEADER: Final = "Graddiag-Events-Source"

router = APIRouter(prefix="/v1/runs", tags=["runs"])


@dataclass(frozen=True)
class EventsArchive:
    """A run's events as a gzipped tar, and whether the worker wrote them or they were built from the report."""

    data: bytes
    source: Literal["worker", "report"]


def _export_module() -> ModuleType:
    try:
        import graddiag.service.export.tensorboard as export
    except ImportError as exc:
        raise ApiProblem(
            501,
            "tensorboard_unavailable",
            f"TensorBoard export needs the 'tensorboard' package on the server: pip install '{EXTRA}'.",
        ) from exc
    return export


def events_archive(session: Session, settings: Settings, run_id: str) -> EventsArchive:
    """The run's events as a tar.gz (folder = run id).

    Raises RunNotFound, ApiProblem 409 for a run that has not succeeded, ApiProblem 501 without tensorboard.
    """
    try:
        log_dir = settings.tensorboard_run_dir(run_id)
    except ValueError:
        # No run can have such an id (ids are uuid hex), and it must never reach the file system.
        raise RunNotFound(run_id) from None
    run = store.get_run(session, run_id)
    if run.status != "succeeded":
        raise ApiProblem(
            409, "run_not_succeeded", f"run {run_id!r} is {run.status}; only a succeeded run has TensorBoard events"
        )
    export = _export_module()
    if log_dir.is_dir():
        try:
            return EventsArchive(export.archive(log_dir, arcname=run_id), "worker")
        except FileNotFoundError:
            pass  # the directory holds no event file (a write that failed midway): build them from the report
    report = store.load_report(session, run_id)
    assert report is not None  # the run has succeeded
    with tempfile.TemporaryDirectory(prefix="graddiag-tb-") as scratch:
        built = export.write_events(report, Path(scratch) / run_id)
        return EventsArchive(export.archive(built, arcname=run_id), "report")


@router.get(
    "/{run_id}/tensorboard",
    response_class=Response,
    responses={
        200: {"content": {MEDIA_TYPE: {}}, "description": "tar.gz holding `<run id>/events.out.tfevents.*`."},
        **documented(404, 409, 501),
    },
    summary="TensorBoard events",
)
def get_tensorboard(run_id: str, session: SessionDep, settings: SettingsDep) -> Response:
    """The run's TensorBoard event files as a tar.gz; with gradient histograms when the worker wrote them.

    409 until the run has succeeded; 501 when the server lacks the `graddiag[tensorboard]` extra.
    """
    archive = events_archive(session, settings, run_id)
    return Response(
        archive.data,
        media_type=MEDIA_TYPE,
        headers={
            "Content-Disposition": f'attachment; filename="{run_id}-tensorboard.tar.gz"',
            SOURCE_HEADER: archive.source,
        },
    )
