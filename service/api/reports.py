"""`POST /v1/reports`: store a report computed elsewhere (graddiag.diagnose / watch) as an external run.

The body is the engine's own Report shape, so a client uploads exactly what `diagnose` returned. A
report whose parts do not add up is refused with a 422 naming each offending place (at most
MAX_REPORTED_ERRORS of them): records or findings naming layers the report lacks, steps outside
``0 … timing.steps_run − 1``, layer indices that are not 0, 1, 2, … in order, time records of layers that
are not recurrent or at a negative time step, duplicate rows, and
non-finite numbers (a non-finite value is written as null in a report; JSON's NaN/Infinity extensions
are refused). Sizes are capped (MAX_REPORT_*), and the server's body cap (`max_body_bytes`) applies first.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Annotated, Any, Final

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from graddiag.service.api.deps import SessionFactoryDep
from graddiag.service.api.errors import documented
from graddiag.service.api.limits import MAX_TIME_RECORDS
from graddiag.service.api.schemas import RunDetail
from graddiag.service.engine.report import Report
from graddiag.service.store import runs as store

# Hard caps on one uploaded report (the body cap usually binds first: 1 MiB holds about 4000 records).
MAX_REPORT_LAYERS: Final = 10_000
MAX_REPORT_STEPS: Final = 100_000
MAX_REPORT_RECORDS: Final = 1_000_000
# Steps and time steps are stored as SQL integers (32 bits on PostgreSQL).
MAX_REPORT_STEP: Final = 2**31 - 2
MAX_REPORT_T: Final = 2**31 - 1
# A layer's name is stored in a 200-character column, its parameter count in a 32-bit SQL integer.
MAX_LAYER_NAME: Final = 200
MAX_LAYER_PARAMS: Final = 2**31 - 1
# An error body names at most this many problems (a million bad records must not make a huge answer).
MAX_REPORTED_ERRORS: Final = 20

Tag = Annotated[str, StringConstraints(min_length=1, max_length=50)]

router = APIRouter(prefix="/v1/reports", tags=["reports"], responses=documented(422))


class ReportUpload(BaseModel):
    """An externally computed report with the uploader's name and tags for it."""

    model_config = ConfigDict(extra="forbid")

    report: Report = Field(description="The report as graddiag.diagnose or watch returned it (spec null, model set).")
    name: str | None = Field(None, min_length=1, max_length=200, description="A name for the run, e.g. resnet18-lr0.1.")
    tags: list[Tag] = Field(default_factory=list, max_length=20, description="Labels to find it by.")


Problem = tuple[tuple[str | int, ...], str, str]


def storable(text: str) -> bool:
    """Whether `text` can be stored in a text column: UTF-8 encodable (no lone surrogate, which JSON's
    ``\\ud800`` escapes can carry) and free of NUL, which PostgreSQL's text refuses."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def _unfit(value: Any, path: tuple[str | int, ...]) -> Iterator[Problem]:
    """Non-finite numbers and strings no text column can hold, anywhere in a dumped report (keys too)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            yield path, "a non-finite number: a report writes NaN and ±Infinity as null", "finite_number"
    elif isinstance(value, str):
        if not storable(value):
            yield path, "text must be UTF-8 without NUL characters", "value_error"
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and not storable(key):
                yield path, "a key must be UTF-8 text without NUL characters", "value_error"
            else:
                yield from _unfit(item, (*path, key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _unfit(item, (*path, i))


def report_problems(report: Report, upload_name: str | None = None, tags: Sequence[str] = ()) -> Iterator[Problem]:
    """Every place where `report` (and the upload's name and tags) does not add up, as (location, message,
    type); empty when it does."""
    at = ("body", "report")
    if upload_name is not None and not storable(upload_name):
        yield ("body", "name"), "the name must be UTF-8 text without NUL characters", "value_error"
    for i, tag in enumerate(tags):
        if not storable(tag):
            yield ("body", "tags", i), "a tag must be UTF-8 text without NUL characters", "value_error"
    if report.spec is not None:
        yield (
            (*at, "spec"),
            "an uploaded report is of a model graddiag did not build: spec must be null and model given "
            "(a spec is probed with POST /v1/runs)",
            "value_error",
        )
    for part, items, cap in (
        ("layers", report.layers, MAX_REPORT_LAYERS),
        ("steps", report.steps, MAX_REPORT_STEPS),
        ("records", report.records, MAX_REPORT_RECORDS),
        ("time_records", report.time_records, MAX_TIME_RECORDS),
    ):
        if len(items) > cap:
            yield (*at, part), f"{len(items)} {part}; at most {cap} are accepted", "too_long"
    if not report.layers:
        yield (*at, "layers"), "a report needs at least one layer", "too_short"
    steps_run = report.timing.steps_run
    if not 1 <= steps_run <= MAX_REPORT_STEP + 1:
        yield (*at, "timing", "steps_run"), f"steps_run={steps_run}; allowed 1 … {MAX_REPORT_STEP + 1}", "out_of_range"
    n = len(report.layers)

    def no_layer(index: int) -> str:
        return f"layer {index} is not one of the report's {n} layers (0 … {n - 1})"

    def outside(step: int) -> str:
        return f"step {step} is outside 0 … {steps_run - 1} (timing.steps_run={steps_run})"

    names: set[str] = set()
    for i, layer in enumerate(report.layers):
        if layer.index != i:
            yield (
                (*at, "layers", i, "index"),
                f"layer {i} has index {layer.index}; indices are 0, 1, 2, … in order",
                "value_error",
            )
        if len(layer.name) > MAX_LAYER_NAME or not layer.name:
            yield (*at, "layers", i, "name"), f"a layer name has 1 … {MAX_LAYER_NAME} characters", "value_error"
        if layer.name in names:
            yield (*at, "layers", i, "name"), f"layer name {layer.name[:80]!r} appears twice", "value_error"
        names.add(layer.name)
        if not 0 <= layer.params <= MAX_LAYER_PARAMS:
            yield (*at, "layers", i, "params"), f"params is a count, 0 … {MAX_LAYER_PARAMS}", "out_of_range"
    seen_steps: set[int] = set()
    for i, metrics in enumerate(report.steps):
        if not 0 <= metrics.step < steps_run:
            yield (
                (*at, "steps", i, "step"),
                f"step {metrics.step} is outside 0 … {steps_run - 1} (timing.steps_run={steps_run})",
                "out_of_range",
            )
        elif metrics.step in seen_steps:
            yield (*at, "steps", i, "step"), f"step {metrics.step} appears twice", "value_error"
        seen_steps.add(metrics.step)
    seen: set[tuple[int, int]] = set()
    for i, record in enumerate(report.records):
        if not 0 <= record.layer < n:
            yield (
                (*at, "records", i, "layer"),
                f"layer {record.layer} is not one of the report's {n} layers (0 … {n - 1})",
                "value_error",
            )
        if not 0 <= record.step < steps_run:
            yield (
                (*at, "records", i, "step"),
                f"step {record.step} is outside 0 … {steps_run - 1} (timing.steps_run={steps_run})",
                "out_of_range",
            )
        if (record.step, record.layer) in seen:
            yield (*at, "records", i), f"a second record of layer {record.layer} at step {record.step}", "value_error"
        seen.add((record.step, record.layer))
    yield from _time_problems(report, at)
    if report.model is not None:
        for i, index in enumerate(report.model.branches):
            if not 0 <= index < n:
                yield (
                    (*at, "model", "branches", i),
                    f"branch layer {index} is not one of the report's {n} layers",
                    "value_error",
                )
    for i, finding in enumerate(report.verdict.findings):
        for j, index in enumerate(finding.layers):
            if not 0 <= index < n:
                yield (
                    (*at, "verdict", "findings", i, "layers", j),
                    f"layer {index} is not one of the report's {n} layers",
                    "value_error",
                )
    yield from _unfit(report.model_dump(), at)


def _time_problems(report: Report, at: tuple[str | int, ...]) -> Iterator[Problem]:
    """Time records naming no recurrent layer of the report, steps outside the run, negative time steps
    and a second row of the same (step, layer, t)."""
    recurrent = {layer.index for layer in report.layers if layer.kind == "recurrent"}
    steps_run = report.timing.steps_run
    seen: set[tuple[int, int, int]] = set()
    for i, row in enumerate(report.time_records):
        where: tuple[str | int, ...] = (*at, "time_records", i)
        if row.layer not in recurrent:
            named = ", ".join(map(str, sorted(recurrent)[:MAX_REPORTED_ERRORS])) or "none"
            yield (
                (*where, "layer"),
                f"layer {row.layer} is not a recurrent layer of the report (kind 'recurrent'; the report's: {named})",
                "value_error",
            )
        if not 0 <= row.step < steps_run:
            yield (
                (*where, "step"),
                f"step {row.step} is outside 0 … {steps_run - 1} (timing.steps_run={steps_run})",
                "out_of_range",
            )
        if not 0 <= row.t <= MAX_REPORT_T:
            yield (*where, "t"), f"t={row.t}; a time step is 0 … {MAX_REPORT_T}", "out_of_range"
        key = (row.step, row.layer, row.t)
        if key in seen:
            yield where, f"a second time record of layer {row.layer} at step {row.step}, t={row.t}", "value_error"
        seen.add(key)


def check_report(report: Report, upload_name: str | None = None, tags: Sequence[str] = ()) -> None:
    """Raise a 422 naming up to MAX_REPORTED_ERRORS problems of `report`, or return when it adds up."""
    problems = []
    for problem in report_problems(report, upload_name, tags):
        problems.append(problem)
        if len(problems) == MAX_REPORTED_ERRORS:
            break
    if problems:
        raise RequestValidationError([{"loc": loc, "msg": msg, "type": kind} for loc, msg, kind in problems])


def _store(factory: sessionmaker[Session], upload: ReportUpload) -> RunDetail:
    with factory() as session:
        run = store.create_external_run(session, upload.report, name=upload.name, tags=upload.tags)
        report = store.load_report(session, run.id)
        return RunDetail.model_validate(run, from_attributes=True).model_copy(update={"report": report})


@router.post(
    "",
    status_code=201,
    response_model=RunDetail,
    responses={201: {"description": "Stored as a succeeded external run; `Location` names it."}},
    summary="Upload a report of your own model",
)
async def upload_report(
    upload: ReportUpload, request: Request, response: Response, factory: SessionFactoryDep
) -> RunDetail:
    """Store a report that graddiag.diagnose or graddiag.watch computed as a run with `source: external`.

    It is listed by `GET /v1/runs` (filter `?source=external`), shown on the dashboard and in `/compare`
    beside probe runs, and exported as CSV and TensorBoard events like any run.
    """
    check_report(upload.report, upload.name, upload.tags)
    detail = await run_in_threadpool(_store, factory, upload)
    response.headers["Location"] = str(request.app.url_path_for("get_run", run_id=detail.id))
    return detail
