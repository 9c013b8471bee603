"""Runs: create, find, list, cancel, delete, and the report kept in tidy per-run tables.

Plain functions over a Session; the API's routes are thin wrappers. Functions that change data commit
their own transaction (a write transaction holds SQLite's single write lock, so it is kept short).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import ColumnElement, Connection, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from graddiag.models.spec import (
    Activation,
    Arch,
    BiasInit,
    ClipMode,
    Dataset,
    Device,
    Init,
    Norm,
    NormPosition,
    Optimizer,
    Pooling,
    Spec,
)
from graddiag.service.engine.report import (
    EvalResult,
    FindingKind,
    Label,
    LayerInfo,
    LayerRecord,
    ModelDescription,
    Report,
    StepMetrics,
    TimeRecord,
    Timing,
    Verdict,
)
from graddiag.service.store.query import (
    JSON_SPEC_FIELDS,
    SORTABLE,
    Clause,
    equals,
    filter_condition,
    has_tag,
    name_contains,
    parse_filter,
    sort_expression,
)
from graddiag.service.store.tables import (
    SPEC_COLUMNS,
    Base,
    Run,
    RunLayer,
    RunRecord,
    RunSource,
    RunStatus,
    RunStep,
    RunTimeRecord,
    stamp,
)

RowModel = TypeVar("RowModel", LayerInfo, StepMetrics, LayerRecord, TimeRecord)
# Integers a filter compares with a column: bounded to 64 bits, which SQL integers are (beyond, the
# driver raises OverflowError instead of matching nothing).
SqlInt = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]

# The verdict is split over columns: the label (filtered on), the evidence (read by dashboards), the rest.
_VERDICT_SPLIT: Final[frozenset[str]] = frozenset({"label", "evidence"})

log = logging.getLogger(__name__)
# A listing names at most this many tags (each a LIKE condition).
MAX_TAG_FILTERS: Final = 20


class RunNotFound(LookupError):
    """No run has this id."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id!r} not found")
        self.run_id = run_id


class RunFinished(RuntimeError):
    """The run already finished, so the operation no longer applies (e.g. cancelling it)."""


class RunFilters(BaseModel):
    """Filters, order and page of a run listing; None means "any"."""

    model_config = ConfigDict(extra="forbid")

    arch: Arch | None = None
    activation: Activation | None = None
    init: Init | None = None
    norm: Norm | None = None
    residual: bool | None = None
    depth: SqlInt | None = None
    width: SqlInt | None = None
    optimizer: Optimizer | None = None
    lr: float | None = None
    clip_value: float | None = None
    dataset: Dataset | None = None
    seed: SqlInt | None = None
    # The spec fields without a column of their own (read from the spec JSON).
    init_gain: float | None = None
    init_std: float | None = None
    bias_init: BiasInit | None = None
    clip_mode: ClipMode | None = None
    weight_decay: float | None = None
    l1: float | None = None
    batch_size: SqlInt | None = None
    steps: SqlInt | None = None
    record_every: SqlInt | None = None
    device: Device | None = None
    tensorboard: bool | None = None
    forget_bias: float | Literal["chrono"] | None = None
    heads: SqlInt | None = None
    norm_position: NormPosition | None = None
    mlp_ratio: SqlInt | None = None
    pooling: Pooling | None = None
    status: RunStatus | None = None
    verdict: Label | None = None
    sweep_id: str | None = None
    source: RunSource | None = Field(None, description="probe (a spec's run) or external (an uploaded report).")
    name: str | None = Field(None, max_length=200, description="Only runs whose name contains this (any case).")
    tag: list[str] | None = Field(None, description="Only runs with this tag; repeated, runs with all of them.")
    finding: list[FindingKind] | None = Field(
        None, description="Only runs whose verdict has a finding of this kind; repeated, runs that have all of them."
    )
    depth_min: SqlInt | None = None
    depth_max: SqlInt | None = None
    filter: str | None = Field(
        None,
        description="Clauses NAME OP VALUE joined by 'and', on any spec field, status, verdict or result metric, "
        "e.g. \"verdict = 'vanishing' and decades_per_layer < -0.3\" (operators = != < <= > >=; values are "
        "numbers, quoted strings, true, false or null).",
    )
    sort: str = Field(
        "-created_at",
        description="A spec field, created_at, started_at, finished_at, status, verdict or a result metric "
        "(decades_per_layer, act_decades_per_layer, rel_grad_median, eval_accuracy, eval_loss, total_s, …); "
        "'-' for descending.",
    )
    limit: int = Field(50, ge=1, le=1000)
    offset: int = Field(0, ge=0, le=2**63 - 1)

    @field_validator("finding", "tag", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        # `finding=step_size` from Python reads as one kind, as `?finding=step_size` does over HTTP.
        return [value] if isinstance(value, str) else value

    @field_validator("tag")
    @classmethod
    def _distinct_tags(cls, value: list[str] | None) -> list[str] | None:
        # As for findings: one condition per distinct tag, and a bounded number of them.
        tags = None if value is None else list(dict.fromkeys(value))
        if tags is not None and len(tags) > MAX_TAG_FILTERS:
            raise ValueError(f"at most {MAX_TAG_FILTERS} distinct tags")
        return tags

    @field_validator("finding")
    @classmethod
    def _distinct(cls, value: list[FindingKind] | None) -> list[FindingKind] | None:
        # One condition per distinct kind (at most one per kind there is): a kind repeated 3000 times
        # would otherwise nest 3000 ANDs, past SQLite's expression depth limit of 1000.
        return None if value is None else list(dict.fromkeys(value))

    @field_validator("sort")
    @classmethod
    def _known_sort(cls, value: str) -> str:
        if value.removeprefix("-") not in SORTABLE:
            raise ValueError(f"sort by one of {', '.join(sorted(SORTABLE))} (prefix '-' for descending)")
        return value

    @field_validator("filter")
    @classmethod
    def _parsable_filter(cls, value: str | None) -> str | None:
        if value is not None:
            parse_filter(value)  # a mistake is a 422 naming it; the route parses again to build the SQL
        return value

    def clauses(self) -> list[Clause]:
        """The parsed `filter` expression (empty without one)."""
        return parse_filter(self.filter) if self.filter is not None else []


def build_run(
    spec: Spec,
    *,
    sweep_id: str | None = None,
    grid: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    name: str | None = None,
    tags: list[str] | None = None,
) -> Run:
    """A new queued Run for `spec` (not yet added to a session), with an optional name and tags."""
    return Run(
        id=uuid.uuid4().hex,
        source="probe",
        spec=_json_value(spec),
        spec_hash=spec.fingerprint(),
        **{name: getattr(spec, name) for name in SPEC_COLUMNS},
        status="queued",
        attempt=0,
        cancel_requested=False,
        sweep_id=sweep_id,
        grid=grid,
        idempotency_key=idempotency_key,
        name=name or None,
        tags=tags,
        **stamp("created"),
    )


def _by_idempotency_key(session: Session, key: str) -> Run | None:
    return session.scalars(select(Run).where(Run.idempotency_key == key)).one_or_none()


def create_run(
    session: Session,
    spec: Spec,
    *,
    sweep_id: str | None = None,
    idempotency_key: str | None = None,
    name: str | None = None,
    tags: list[str] | None = None,
) -> tuple[Run, bool]:
    """Queue a run of `spec` (named and tagged if given) and commit; (run, created).

    With an idempotency key seen before, nothing is created: (the earlier run, False).
    """
    if idempotency_key is not None:
        earlier = _by_idempotency_key(session, idempotency_key)
        if earlier is not None:
            session.commit()  # ends the (write-locking) transaction the lookup opened
            return earlier, False
    run = build_run(spec, sweep_id=sweep_id, idempotency_key=idempotency_key, name=name, tags=tags)
    session.add(run)
    try:
        session.commit()
    except IntegrityError:
        # A concurrent request with the same key committed first (PostgreSQL; SQLite serialises writers).
        session.rollback()
        earlier = _by_idempotency_key(session, idempotency_key) if idempotency_key is not None else None
        if earlier is None:
            raise
        return earlier, False
    return run, True


def get_run(session: Session, run_id: str) -> Run:
    """The run with this id; raises RunNotFound."""
    run = session.get(Run, run_id, populate_existing=True)
    if run is None:
        raise RunNotFound(run_id)
    return run


def _conditions(filters: RunFilters) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    for name in (*SPEC_COLUMNS, "status", "verdict", "sweep_id", "source"):
        value = getattr(filters, name)
        if value is not None:
            conditions.append(getattr(Run, name) == value)
    for name in JSON_SPEC_FIELDS:
        value = getattr(filters, name)
        if value is not None:
            conditions.append(equals(name, value))
    if filters.filter is not None:
        conditions.append(filter_condition(filters.clauses()))
    if filters.name:
        conditions.append(name_contains(Run.name, filters.name))
    conditions.extend(has_tag(Run.tags, tag) for tag in filters.tag or ())
    for kind in filters.finding or ():
        # autoescape: kinds hold '_', a LIKE wildcard; the delimiters make it match whole kinds only.
        conditions.append(Run.finding_kinds.contains(f",{kind},", autoescape=True))
    if filters.depth_min is not None:
        conditions.append(Run.depth >= filters.depth_min)
    if filters.depth_max is not None:
        conditions.append(Run.depth <= filters.depth_max)
    return conditions


def list_runs(session: Session, filters: RunFilters) -> tuple[list[Run], int]:
    """One page of the runs matching `filters`, in their order, and how many match in all."""
    conditions = _conditions(filters)
    total = session.scalar(select(func.count()).select_from(Run).where(*conditions)) or 0
    # NULLS LAST on both backends (SQLite puts NULL first, PostgreSQL last); the id makes pages stable.
    # Sort and skip over ids alone, then load the page's rows: sorting whole rows (spec and evidence
    # JSON) for a deep offset costs several times more.
    page = select(Run.id).where(*conditions).order_by(sort_expression(filters.sort), Run.id)
    page = page.limit(filters.limit).offset(filters.offset)
    ids = list(session.scalars(page))
    rows = {run.id: run for run in session.scalars(select(Run).where(Run.id.in_(ids)))}
    return [rows[run_id] for run_id in ids], total


def _finite(value: Any) -> Any:
    # SQLite would store NaN as NULL anyway and PostgreSQL would keep it; NULL on both keeps them equal.
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _json_value(model: BaseModel) -> Any:
    # Through JSON text: pydantic writes non-finite floats as null there, and JSON columns cannot hold NaN.
    return json.loads(model.model_dump_json())


def encode_finding_kinds(kinds: Iterable[str]) -> str:
    """The `runs.finding_kinds` value: the distinct kinds, sorted, as `,kind_a,kind_b,` (`,` for none)."""
    return "".join(f",{kind}" for kind in sorted(set(kinds))) + ","


def decode_finding_kinds(value: str | None) -> list[FindingKind] | None:
    """The kinds held in a `runs.finding_kinds` value, sorted; None for NULL (the run has no report)."""
    if value is None:
        return None
    return [cast(FindingKind, kind) for kind in value.split(",") if kind]


def report_columns(report: Report) -> dict[str, Any]:
    """The `runs` column values that hold a report's verdict, evaluation and timing.

    `finding_kinds` is derived here from the same verdict that fills `verdict_detail`, so one UPDATE
    writes both and they cannot disagree.
    """
    verdict = _json_value(report.verdict)
    return {
        "verdict": report.verdict.label,
        "finding_kinds": encode_finding_kinds(finding.kind for finding in report.verdict.findings),
        "evidence": verdict["evidence"],
        "verdict_detail": {key: value for key, value in verdict.items() if key not in _VERDICT_SPLIT},
        "eval_result": _json_value(report.eval),
        "timing": _json_value(report.timing),
    }


ReportRows = list[tuple[type[Base], list[dict[str, Any]]]]


def report_rows(run_id: str, report: Report) -> ReportRows:
    """A report's layers, steps, records and time records as tidy rows per table (built before a write
    transaction, so the write lock is held only for the inserts)."""
    tables: tuple[
        tuple[type[Base], list[LayerInfo] | list[StepMetrics] | list[LayerRecord] | list[TimeRecord]], ...
    ] = (
        (RunLayer, report.layers),
        (RunStep, report.steps),
        (RunRecord, report.records),
        (RunTimeRecord, report.time_records),
    )
    return [
        (
            table,
            [
                {"run_id": run_id, **{key: _finite(value) for key, value in model.model_dump().items()}}
                for model in models
            ],
        )
        for table, models in tables
    ]


def insert_report_rows(connection: Connection | Session, rows: ReportRows) -> None:
    """Insert tidy report rows, one executemany per table."""
    for table, table_rows in rows:
        if table_rows:
            connection.execute(insert(table), table_rows)


def _read_rows(
    session: Session,
    model: type[RowModel],
    table: type[RunLayer | RunStep | RunRecord | RunTimeRecord],
    run_id: str,
    *conditions: ColumnElement[bool],
    order_by: tuple[str, ...],
) -> list[RowModel]:
    # The tidy tables' columns are named after the report model's fields, so one select fits them all.
    columns = table.__table__.c
    query = (
        select(*(columns[name] for name in model.model_fields))
        .where(columns["run_id"] == run_id, *conditions)
        .order_by(*(columns[name] for name in order_by))
    )
    # From plain dicts: validating a RowMapping (a generic Mapping to pydantic) took ~1.5x as long.
    names = tuple(model.model_fields)
    return [model.model_validate(dict(zip(names, row, strict=True))) for row in session.execute(query)]


def layer_rows(session: Session, run_id: str) -> list[LayerInfo]:
    """The run's layers in forward order (empty until it succeeded); raises RunNotFound."""
    get_run(session, run_id)
    return _read_rows(session, LayerInfo, RunLayer, run_id, order_by=("index",))


RECORD_FIELDS: Final[tuple[str, ...]] = tuple(LayerRecord.model_fields)


def layer_names(session: Session, run_id: str) -> dict[int, str]:
    """The run's layer names by index (empty until it succeeded)."""
    query = select(RunLayer.index, RunLayer.name).where(RunLayer.run_id == run_id)
    return {index: name for index, name in session.execute(query)}


def gradient_table(
    session: Session,
    run_id: str,
    *,
    layer: int | None = None,
    step_from: int | None = None,
    step_to: int | None = None,
) -> list[tuple[Any, ...]]:
    """The run's per-layer records as plain tuples in RECORD_FIELDS order, by (step, layer).

    Optionally one layer and an inclusive step range. Exports use the tuples directly: validating a
    model per row costs ~0.5 s for a 50-layer x 500-step run. Raises RunNotFound.
    """
    get_run(session, run_id)
    columns = RunRecord.__table__.c
    conditions: list[ColumnElement[bool]] = [columns.run_id == run_id]
    if layer is not None:
        conditions.append(columns.layer == layer)
    if step_from is not None:
        conditions.append(columns.step >= step_from)
    if step_to is not None:
        conditions.append(columns.step <= step_to)
    query = select(*(columns[name] for name in RECORD_FIELDS)).where(*conditions).order_by(columns.step, columns.layer)
    return [tuple(row) for row in session.execute(query)]


def gradient_rows(
    session: Session,
    run_id: str,
    *,
    layer: int | None = None,
    step_from: int | None = None,
    step_to: int | None = None,
) -> list[LayerRecord]:
    """gradient_table's rows as LayerRecord models; empty until the run succeeded."""
    rows = gradient_table(session, run_id, layer=layer, step_from=step_from, step_to=step_to)
    return [LayerRecord.model_validate(dict(zip(RECORD_FIELDS, row, strict=True))) for row in rows]


def recorded_step_range(session: Session, run_id: str) -> tuple[int, int] | None:
    """(first, last) recorded step of the run; None when it has no records."""
    first, last = session.execute(
        select(func.min(RunRecord.step), func.max(RunRecord.step)).where(RunRecord.run_id == run_id)
    ).one()
    return None if first is None else (int(first), int(last))


TIME_FIELDS: Final[tuple[str, ...]] = tuple(TimeRecord.model_fields)
# One run's time records are read in the order of their primary key.
TIME_ORDER: Final = ("step", "layer", "t")
# The layer kind whose rows the time records are (a recurrent layer's recurrent matrix).
RECURRENT_KIND: Final = "recurrent"


def recurrent_layers(session: Session, run_id: str) -> list[tuple[int, str]]:
    """(index, name) of the run's recurrent layers in forward order: the layers its time records are
    of (empty for a run without any, or before it succeeded)."""
    query = (
        select(RunLayer.index, RunLayer.name)
        .where(RunLayer.run_id == run_id, RunLayer.kind == RECURRENT_KIND)
        .order_by(RunLayer.index)
    )
    return [(index, name) for index, name in session.execute(query)]


def time_steps(session: Session, run_id: str) -> list[int]:
    """The steps at which the run has time records, in order (read from the primary key)."""
    query = select(RunTimeRecord.step).where(RunTimeRecord.run_id == run_id).distinct().order_by(RunTimeRecord.step)
    return list(session.scalars(query))


def _time_conditions(run_id: str, layer: int | None, step: int | None) -> list[ColumnElement[bool]]:
    columns = RunTimeRecord.__table__.c
    conditions: list[ColumnElement[bool]] = [columns.run_id == run_id]
    if layer is not None:
        conditions.append(columns.layer == layer)
    if step is not None:
        conditions.append(columns.step == step)
    return conditions


def time_count(session: Session, run_id: str, *, layer: int | None = None, step: int | None = None) -> int:
    """How many rows time_table would return (counted on the primary key's index); raises RunNotFound."""
    get_run(session, run_id)
    query = select(func.count()).select_from(RunTimeRecord).where(*_time_conditions(run_id, layer, step))
    return session.scalar(query) or 0


def time_table(
    session: Session, run_id: str, *, layer: int | None = None, step: int | None = None
) -> list[tuple[Any, ...]]:
    """The run's time records as plain tuples in TIME_FIELDS order, by (step, layer, t); optionally of one
    layer and/or one step. Plain tuples for the same reason as gradient_table. Raises RunNotFound."""
    get_run(session, run_id)
    columns = RunTimeRecord.__table__.c
    query = select(*(columns[name] for name in TIME_FIELDS)).where(*_time_conditions(run_id, layer, step))
    return [tuple(row) for row in session.execute(query.order_by(*(columns[name] for name in TIME_ORDER)))]


def load_report(session: Session, run_id: str) -> Report | None:
    """The report of a succeeded run, rebuilt from the tidy tables; None before it succeeded."""
    run = get_run(session, run_id)
    if run.status != "succeeded":
        return None
    verdict = Verdict.model_validate({**(run.verdict_detail or {}), "label": run.verdict, "evidence": run.evidence})
    external = run.source == "external"
    return Report(
        spec=None if external else Spec.model_validate(run.spec),
        model=ModelDescription.model_validate(run.model) if external else None,
        layers=_read_rows(session, LayerInfo, RunLayer, run_id, order_by=("index",)),
        steps=_read_rows(session, StepMetrics, RunStep, run_id, order_by=("step",)),
        records=_read_rows(session, LayerRecord, RunRecord, run_id, order_by=("step", "layer")),
        time_records=_read_rows(session, TimeRecord, RunTimeRecord, run_id, order_by=TIME_ORDER),
        verdict=verdict,
        eval=EvalResult.model_validate(run.eval_result),
        timing=Timing.model_validate(run.timing),
    )


def create_external_run(session: Session, report: Report, *, name: str | None, tags: list[str]) -> Run:
    """Store an uploaded report (one of a model graddiag did not build) as a succeeded external run, and commit.

    The run has the report's model description instead of a spec; its layers, steps and records go to
    the tidy tables in the same transaction, so the run is never seen without them.
    """
    if report.model is None:
        raise ValueError("an external run needs the report's model description")
    run = Run(
        id=uuid.uuid4().hex,
        source="external",
        spec=None,
        spec_hash=None,
        model=_json_value(report.model),
        name=name,
        tags=tags,
        status="succeeded",
        attempt=0,
        cancel_requested=False,
        **report_columns(report),
        **stamp("created"),
        **stamp("started"),
        **stamp("finished"),
    )
    rows = report_rows(run.id, report)
    session.add(run)
    session.flush()
    insert_report_rows(session, rows)
    session.commit()
    return run


def cancel_run(session: Session, run_id: str) -> Run:
    """Cancel a run and commit: a queued run at once; a running one is flagged and its worker stops it.

    Raises RunFinished for a run already succeeded, failed or cancelled, RunNotFound for no run.
    """
    # Conditional UPDATEs rather than read-then-write, so a worker finishing the run at the same
    # moment cannot be overwritten.
    queued = session.execute(
        update(Run)
        .where(Run.id == run_id, Run.status == "queued")
        .values(status="cancelled", **stamp("finished"))
        .returning(Run.id)
    ).first()
    if queued is None:
        running = session.execute(
            update(Run).where(Run.id == run_id, Run.status == "running").values(cancel_requested=True).returning(Run.id)
        ).first()
        if running is None:
            status = session.scalar(select(Run.status).where(Run.id == run_id))
            session.rollback()
            if status is None:
                raise RunNotFound(run_id)
            raise RunFinished(f"run {run_id!r} is already {status}; only a queued or running run can be cancelled")
    session.commit()
    return get_run(session, run_id)


def delete_run(session: Session, run_id: str, events_dir: Path | None = None) -> None:
    """Delete a run and (by ON DELETE CASCADE) its report rows, and commit; raises RunNotFound.

    `events_dir`, the run's TensorBoard folder, is removed once the row is gone (a folder left behind
    would outlive every trace of its run). A worker still training the run loses its lease on the next
    heartbeat and stops without writing.
    """
    deleted = session.execute(delete(Run).where(Run.id == run_id).returning(Run.id)).first()
    if deleted is None:
        session.rollback()
        raise RunNotFound(run_id)
    session.commit()
    if events_dir is not None:
        remove_events(events_dir)


def remove_events(events_dir: Path) -> None:
    """Remove a run's TensorBoard folder if there is one; a failure is logged (the row is what counts)."""
    try:
        shutil.rmtree(events_dir)
    except FileNotFoundError:
        pass
    except OSError:
        log.warning("could not remove the TensorBoard folder %s", events_dir, exc_info=True)
