"""`GET /v1/runs/{id}/tensorboard`: a succeeded run's TensorBoard events as a tar.gz (export/archive.py)."""

from __future__ import annotations

from typing import Final

from fastapi import APIRouter, Response

from graddiag.service.api.deps import RunIdDep, SessionDep, SettingsDep
from graddiag.service.api.errors import ApiProblem, documented
from graddiag.service.export.archive import RunNotSucceeded, TensorBoardUnavailable, events_archive

MEDIA_TYPE: Final = "application/gzip"
# Response header saying where the events came from: "worker" (with histograms) or "report".
SOURCE_HEADER: Final = "Graddiag-Events-Source"

router = APIRouter(prefix="/v1/runs", tags=["runs"])


@router.get(
    "/{run_id}/tensorboard",
    response_class=Response,
    responses={
        200: {"content": {MEDIA_TYPE: {}}, "description": "tar.gz holding `<run id>/events.out.tfevents.*`."},
        **documented(404, 409, 501),
    },
    summary="TensorBoard events",
)
def get_tensorboard(run_id: RunIdDep, session: SessionDep, settings: SettingsDep) -> Response:
    """The run's TensorBoard event files as a tar.gz; with gradient histograms when the worker wrote them.

    409 until the run has succeeded; 501 when the server lacks the `graddiag[tensorboard]` extra.
    """
    try:
        archive = events_archive(session, settings, run_id)
    except RunNotSucceeded as exc:
        raise ApiProblem(409, "run_not_succeeded", str(exc)) from None
    except TensorBoardUnavailable as exc:
        raise ApiProblem(501, "tensorboard_unavailable", str(exc)) from None
    return Response(
        archive.data,
        media_type=MEDIA_TYPE,
        headers={
            "Content-Disposition": f'attachment; filename="{archive.folder}-tensorboard.tar.gz"',
            SOURCE_HEADER: archive.source,
        },
    )
