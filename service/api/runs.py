"""`/v1/runs`: submit, list, read, export, cancel and delete runs — thin wrappers over service.store.runs."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from graddiag.models.shapes import layer_count
from graddiag.models.spec import MAX_DEPTH, MAX_STEPS, Spec
from graddiag.service.api.data import require_cifar10
from graddiag.service.api.deps import RunIdDep, SessionDep, SessionFactoryDep, SettingsDep
from graddiag.service.api.errors import documented
from graddiag.service.api.labels import query_labels
from graddiag.service.api.limits import MAX_TIME_RECORDS, check_page_size, check_spec
from graddiag.service.api.reports import MAX_REPORT_LAYERS, MAX_REPORT_STEP
from graddiag.service.api.schemas import RecurrentLayer, RunDetail, RunList, RunSummary, TimeProfile
from graddiag.service.engine.report import LayerInfo, LayerRecord
from graddiag.service.store import labels as label_store
from graddiag.service.store import runs as store
from graddiag.service.store.ids import expand_id
from graddiag.service.store.labels import MAX_TAGS, Labels
from graddiag.service.store.tables import FINISHED, Run, Sweep

MAX_WAIT_SECONDS = 600.0
# The most parameterised layers a spec's network has (a pre-LN transformer with a class token, 8 per
# block): bounds `?layer=`, whose larger values would overflow a SQL integer.
MAX_LAYER_INDEX = layer_count(Spec(arch="transformer", depth=MAX_DEPTH, width=8, heads=1, pooling="cls")) - 1
# An uploaded report (POST /v1/reports) may have more layers and later steps than any probe.
MAX_QUERY_LAYER = max(MAX_LAYER_INDEX, MAX_REPORT_LAYERS - 1)
MAX_QUERY_STEP = max(MAX_STEPS, MAX_REPORT_STEP)
# How often a `?wait=` request re-reads the run: one indexed primary-key read per tick.
WAIT_POLL_SECONDS = 0.2

router = APIRouter(prefix="/v1/runs", tags=["runs"], responses=documented(422))


def run_location(request: Request, run_id: str) -> str:
    """The run's URL path, for `Location` headers."""
    return str(request.app.url_path_for("get_run", run_id=run_id))


def run_detail(session: Session, run: Run) -> RunDetail:
    """A run in full; the report is rebuilt from the tidy tables only once the run has succeeded."""
    report = store.load_report(session, run.id) if run.status == "succeeded" else None
    return RunDetail.model_validate(run, from_attributes=True).model_copy(update={"report": report})


def _read_detail(factory: sessionmaker[Session], run_id: str) -> RunDetail:
    with factory() as session:
        return run_detail(session, store.get_run(session, run_id))


def _read_status(factory: sessionmaker[Session], run_id: str) -> str:
    with factory() as session:
        return store.get_run(session, run_id).status


def _create(
    factory: sessionmaker[Session], spec: Spec, idempotency_key: str | None, labels: Labels
) -> tuple[Run, bool]:
    with factory() as session:
        return store.create_run(session, spec, idempotency_key=idempotency_key, name=labels.name, tags=labels.tags)


async def wait_for_run(request: Request, factory: sessionmaker[Session], run_id: str, wait: float) -> RunDetail:
    """Re-read the run until it finishes, `wait` seconds pass or the client goes away.

    Database reads run in the thread pool and the pauses are `asyncio.sleep`, so a thousand waiting
    clients cost a thousand sleeping coroutines, not a thousand blocked threads.
    """
    deadline = time.monotonic() + wait
    while (remaining := deadline - time.monotonic()) > 0:
        if await run_in_threadpool(_read_status, factory, run_id) in FINISHED:
            break
        if await request.is_disconnected():
            break
        await asyncio.sleep(min(WAIT_POLL_SECONDS, remaining))
    return await run_in_threadpool(_read_detail, factory, run_id)


@router.post(
    "",
    status_code=202,
    response_model=RunDetail,
    responses={
        200: {"model": RunDetail, "description": "The run had already finished (with `wait`)."},
        202: {"description": "Queued (or still running when `wait` ran out)."},
        **documented(503),
    },
    summary="Submit a spec",
)
async def submit_run(
    spec: Spec,
    request: Request,
    response: Response,
    settings: SettingsDep,
    factory: SessionFactoryDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=200,
            description="Retries with the same key return the same run instead of a new one.",
        ),
    ] = None,
    wait: Annotated[
        float,
        Query(ge=0, le=MAX_WAIT_SECONDS, description="Block up to this many seconds for the verdict."),
    ] = 0.0,
    name: Annotated[str | None, Query(max_length=200, description="A name for the run (editable later).")] = None,
    tag: Annotated[
        list[str] | None, Query(max_length=MAX_TAGS, description="A tag for the run; repeat for several.")
    ] = None,
) -> RunDetail:
    """Queue a probe of `spec`. 202 while it is unfinished, 200 once finished (see `wait`)."""
    check_spec(spec, settings)
    labels = query_labels(name, tag)
    if spec.dataset == "cifar10":
        require_cifar10(request, settings)
    run, created = await run_in_threadpool(_create, factory, spec, idempotency_key, labels)
    if not created and run.spec_hash != spec.fingerprint():
        # IETF idempotency-key draft: reusing a key for a different payload is a client error.
        raise RequestValidationError(
            [
                {
                    "loc": ("header", "idempotency-key"),
                    "msg": f"this key was already used for run {run.id} with a different spec",
                    "type": "idempotency_key_reused",
                }
            ]
        )
    detail = await wait_for_run(request, factory, run.id, wait)
    response.headers["Location"] = run_location(request, run.id)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    response.status_code = 200 if detail.status in FINISHED else 202
    return detail


@router.get("", response_model=RunList, summary="List and filter runs")
def list_runs(session: SessionDep, settings: SettingsDep, filters: Annotated[store.RunFilters, Query()]) -> RunList:
    """Runs matching every given filter, sorted (`sort=-created_at` by default) and paginated."""
    check_page_size(filters.limit, settings)
    if filters.sweep_id is not None:
        # A sweep named by a unique prefix of its id (as the dashboard and CLI print it) filters by that sweep.
        full = expand_id(session, Sweep, filters.sweep_id)
        filters = filters.model_copy(update={"sweep_id": full or filters.sweep_id})
    rows, total = store.list_runs(session, filters)
    return RunList(
        items=[RunSummary.model_validate(r, from_attributes=True) for r in rows],
        total=total,
        limit=filters.limit,
        offset=filters.offset,
    )


@router.get("/{run_id}", response_model=RunDetail, responses=documented(404, 409), summary="Read one run")
def get_run(run_id: RunIdDep, session: SessionDep) -> RunDetail:
    """Status, progress, attempt, error and timestamps; the verdict and the full report once succeeded."""
    return run_detail(session, store.get_run(session, run_id))


@router.get("/{run_id}/layers", response_model=list[LayerInfo], responses=documented(404, 409), summary="Run layers")
def get_layers(run_id: RunIdDep, session: SessionDep) -> list[LayerInfo]:
    """The run's parameterised layers in forward order (empty until it has succeeded)."""
    return store.layer_rows(session, run_id)


# The CSV's columns: the LayerRecord fields with the layer's name beside its index, so a spreadsheet or a
# pandas pivot reads `hidden3.linear` rather than a bare number.
assert store.RECORD_FIELDS[:2] == ("step", "layer")
CSV_FIELDS: tuple[str, ...] = ("step", "layer", "layer_name", *store.RECORD_FIELDS[2:])


def records_csv(rows: list[tuple[Any, ...]], layer_names: dict[int, str] | None = None) -> str:
    """CSV with CSV_FIELDS as header (`layer_name` empty for a layer without a name); nulls are empty cells.

    Plain tuples through one `writerows` call: ~0.15 s for a 50-layer × 500-step run (25 000 rows),
    where building a model per row first would take several times that.
    """
    names = layer_names or {}
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_FIELDS)
    writer.writerows((row[0], row[1], names.get(row[1], ""), *row[2:]) for row in rows)
    return buffer.getvalue()


def records_json(rows: list[tuple[Any, ...]]) -> str:
    """A JSON array of objects keyed by the LayerRecord field names (floats as in the CSV)."""
    return json.dumps([dict(zip(store.RECORD_FIELDS, row, strict=True)) for row in rows], separators=(",", ":"))


@router.get(
    "/{run_id}/gradients",
    response_model=list[LayerRecord],
    responses={**documented(404, 409), 200: {"content": {"text/csv": {}}}},
    summary="Per-step, per-layer records",
)
def get_gradients(
    run_id: RunIdDep,
    session: SessionDep,
    layer: Annotated[int | None, Query(ge=0, le=MAX_QUERY_LAYER, description="Only this layer index.")] = None,
    step_from: Annotated[int | None, Query(ge=0, le=MAX_QUERY_STEP, description="First step, inclusive.")] = None,
    step_to: Annotated[int | None, Query(ge=0, le=MAX_QUERY_STEP, description="Last step, inclusive.")] = None,
    format: Annotated[Literal["json", "csv"], Query(description="json (array of rows) or csv.")] = "json",
) -> Response:
    """The tidy rows of the report's `records`, one per (step, layer), ordered by step then layer.

    Empty until the run has succeeded (records are stored with the verdict, in one transaction).
    """
    rows = store.gradient_table(session, run_id, layer=layer, step_from=step_from, step_to=step_to)
    if format == "csv":
        return Response(
            records_csv(rows, store.layer_names(session, run_id)),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{run_id}-gradients.csv"'},
        )
    return Response(records_json(rows), media_type="application/json")


# The time CSV's columns: the TimeRecord fields with the layer's name beside its index.
assert store.TIME_FIELDS[:3] == ("step", "layer", "t")
TIME_CSV_FIELDS: tuple[str, ...] = ("step", "layer", "layer_name", *store.TIME_FIELDS[2:])
CSV_MEDIA_TYPE = "text/csv"
# A 422 lists at most this many of a run's recorded steps.
MAX_LISTED_STEPS = 20


def _quality(accept: str, media_type: str) -> float:
    """The q-value `accept` gives `media_type` (through type/* or */* where it is not named); 0 if none."""
    kind = media_type.split("/")[0]
    found: dict[str, float] = {}
    for part in accept.split(","):
        name, *params = (piece.strip() for piece in part.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        found.setdefault(name.lower(), q)
    for name in (media_type, f"{kind}/*", "*/*"):
        if name in found:
            return found[name]
    return 0.0


def wants_csv(format: str | None, accept: str | None) -> bool:
    """CSV when `?format=csv`, or with no `format` when the Accept header prefers text/csv to JSON."""
    if format is not None:
        return format == "csv"
    if not accept:
        return False
    return _quality(accept, CSV_MEDIA_TYPE) > _quality(accept, "application/json")


def time_csv(rows: list[tuple[Any, ...]], layer_names: dict[int, str]) -> str:
    """CSV with TIME_CSV_FIELDS as header; nulls are empty cells."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(TIME_CSV_FIELDS)
    writer.writerows((row[0], row[1], layer_names.get(row[1], ""), *row[2:]) for row in rows)
    return buffer.getvalue()


def _query_problem(name: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("query", name), "msg": message, "type": "value_error"}])


def _check_time_filters(
    session: Session, run_id: str, layers: list[tuple[int, str]], layer: int | None, step: int | None
) -> None:
    """A 422 naming `layer` when the succeeded run has no such recurrent layer, or `step` when the run has
    time records but none at that step (before the run succeeded nothing can be checked: no rows)."""
    if layer is not None and store.layer_names(session, run_id) and layer not in dict(layers):
        recurrent = ", ".join(f"{index} ({name})" for index, name in layers)
        allowed = f"its recurrent layers are {recurrent}" if layers else "it has no recurrent layers"
        raise _query_problem("layer", f"layer {layer} is not a recurrent layer of this run: {allowed}")
    if step is not None:
        steps = store.time_steps(session, run_id)
        if steps and step not in steps:
            listed = ", ".join(map(str, steps[:MAX_LISTED_STEPS])) + (", …" if len(steps) > MAX_LISTED_STEPS else "")
            raise _query_problem("step", f"step {step} has no time records; recorded steps: {listed}")


@router.get(
    "/{run_id}/time",
    response_model=TimeProfile,
    responses={**documented(404, 409), 200: {"content": {CSV_MEDIA_TYPE: {}}}},
    summary="Gradient through time",
)
def get_time(
    run_id: RunIdDep,
    session: SessionDep,
    layer: Annotated[
        int | None, Query(ge=0, le=MAX_QUERY_LAYER, description="Only this recurrent layer (its index).")
    ] = None,
    step: Annotated[int | None, Query(ge=0, le=MAX_QUERY_STEP, description="Only this recorded step.")] = None,
    format: Annotated[
        Literal["json", "csv"] | None,
        Query(description="json or csv; without it, the Accept header decides (text/csv for CSV), else json."),
    ] = None,
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    """‖∂L/∂h_t‖ (and the cell's gradient, the state's RMS, the gate mean, the saturated fraction) of every
    recurrent layer at every time step t of every recorded step.

    Empty rows and layers for a run without recurrent layers, and until the run has succeeded. The CSV's
    columns: step, layer, layer_name, t, grad_norm, cell_grad_norm, state_rms, gate_mean, saturation_frac.
    """
    count = store.time_count(session, run_id, layer=layer, step=step)
    layers = store.recurrent_layers(session, run_id)
    _check_time_filters(session, run_id, layers, layer, step)
    if count > MAX_TIME_RECORDS:
        name = "layer" if layer is None else "step"
        raise _query_problem(
            name, f"{count} time records match, over the {MAX_TIME_RECORDS} one answer holds: ask for one {name}"
        )
    rows = store.time_table(session, run_id, layer=layer, step=step)
    headers = {"Vary": "Accept"}
    if wants_csv(format, accept):
        return Response(
            time_csv(rows, dict(layers)),
            media_type=f"{CSV_MEDIA_TYPE}; charset=utf-8",
            headers={**headers, "Content-Disposition": f'attachment; filename="{run_id}-time.csv"'},
        )
    body = {
        "run_id": run_id,
        "layers": [RecurrentLayer(index=index, name=name).model_dump() for index, name in layers],
        # Plain tuples to JSON, as for /gradients: a model per row would cost more than the query.
        "rows": [dict(zip(store.TIME_FIELDS, row, strict=True)) for row in rows],
    }
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json", headers=headers)


@router.patch("/{run_id}", response_model=RunDetail, responses=documented(404, 409), summary="Name or tag a run")
def label_run(run_id: RunIdDep, labels: Labels, session: SessionDep) -> RunDetail:
    """Set the run's `name` and/or `tags` (a field left out stays as it is; `name: ""` clears it)."""
    return run_detail(session, label_store.label_run(session, run_id, labels))


@router.post(
    "/{run_id}/cancel",
    response_model=RunDetail,
    status_code=202,
    responses={
        200: {"description": "Cancelled (it was queued)."},
        202: {"description": "Cancellation requested; the worker stops within seconds."},
        **documented(404, 409),
    },
    summary="Cancel a run",
)
def cancel_run(run_id: RunIdDep, session: SessionDep, response: Response) -> RunDetail:
    """A queued run is cancelled at once; a running one stops within ~2 s; a finished one is a 409."""
    run = store.cancel_run(session, run_id)
    response.status_code = 200 if run.status == "cancelled" else 202
    return run_detail(session, run)


@router.delete("/{run_id}", status_code=204, responses=documented(404, 409), summary="Delete a run")
def delete_run(run_id: RunIdDep, session: SessionDep, settings: SettingsDep) -> Response:
    """Remove the run, all its records and its TensorBoard folder."""
    try:
        events_dir = settings.tensorboard_run_dir(run_id)
    except ValueError:
        raise store.RunNotFound(run_id) from None  # not a run id: no row and no folder can have it
    store.delete_run(session, run_id, events_dir)
    return Response(status_code=204)
