"""`/v1/compare`: per-layer gradient profiles of several finished runs, side by side."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy.orm import Session

from graddiag.models.spec import Spec
from graddiag.service.api.deps import SessionDep
from graddiag.service.api.errors import ApiProblem, documented
from graddiag.service.api.schemas import Comparison, FieldError, GradientPoint, LayerProfile, RunProfile
from graddiag.service.engine.report import LayerRecord, ModelDescription
from graddiag.service.store import runs as store
from graddiag.service.store.ids import resolve_run_id
from graddiag.service.store.tables import Run

MAX_COMPARED_RUNS = 20

router = APIRouter(tags=["compare"], responses=documented(404, 409, 422))


def _point(record: LayerRecord | None) -> GradientPoint | None:
    if record is None:
        return None
    return GradientPoint(grad_norm=record.grad_norm, act_grad_norm=record.act_grad_norm, rel_grad=record.rel_grad)


def run_profile(session: Session, run: Run) -> RunProfile:
    """The run's layers with their figures at the first (init) and at the last recorded step."""
    steps = store.recorded_step_range(session, run.id)
    first, last = steps if steps is not None else (None, None)

    def at(step: int | None) -> dict[int, LayerRecord]:
        if step is None:
            return {}
        return {r.layer: r for r in store.gradient_rows(session, run.id, step_from=step, step_to=step)}

    at_first, at_last = at(first), at(last)
    return RunProfile(
        run_id=run.id,
        source="external" if run.source == "external" else "probe",
        spec=Spec.model_validate(run.spec) if run.source != "external" else None,
        model=ModelDescription.model_validate(run.model) if run.source == "external" else None,
        name=run.name,
        verdict=run.verdict,
        init_step=first,
        last_step=last,
        layers=[
            LayerProfile(
                index=info.index,
                name=info.name,
                kind=info.kind,
                init=_point(at_first.get(info.index)),
                last=_point(at_last.get(info.index)),
            )
            for info in store.layer_rows(session, run.id)
        ],
    )


@router.get("/v1/compare", response_model=Comparison, summary="Compare runs layer by layer")
def compare_runs(
    session: SessionDep,
    run_id: Annotated[
        list[str],
        Query(min_length=1, max_length=MAX_COMPARED_RUNS, description="Repeat for each run to compare."),
    ],
) -> Comparison:
    """grad_norm, act_grad_norm and rel_grad of every layer at init and at the last step, per run."""
    runs = [store.get_run(session, resolve_run_id(session, rid)) for rid in run_id]
    unfinished = [
        FieldError(
            loc=["query", "run_id", i],
            msg=f"run {run.id} is {run.status}; only succeeded runs have gradient records",
            type="run_not_succeeded",
        )
        for i, run in enumerate(runs)
        if run.status != "succeeded"
    ]
    if unfinished:
        raise ApiProblem(409, "run_not_succeeded", "; ".join(e.msg for e in unfinished), unfinished)
    return Comparison(runs=[run_profile(session, run) for run in runs])
