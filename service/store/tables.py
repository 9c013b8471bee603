"""The relational schema: one row per run, tidy child tables for the report's per-layer and per-step rows.

Column names of the child tables are exactly the engine report's field names, so a dashboard's SQL reads
like the report. Every timestamp is stored twice: as a timezone-aware datetime for the API and as float
epoch seconds, which Grafana's SQLite data source can read (it does not parse SQLite's datetime text).
Types are portable (JSON, Float, DateTime(timezone=True)) so the same migrations run on PostgreSQL.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Final, Literal

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

RunStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
STATUSES: Final[tuple[RunStatus, ...]] = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED: Final[frozenset[str]] = frozenset({"succeeded", "failed", "cancelled"})
# Where a run's report comes from: a probe of a spec, or an upload of a model graddiag did not build.
RunSource = Literal["probe", "external"]

# The spec fields dashboards filter on; each has an indexed column on `runs` beside the full spec JSON.
SPEC_COLUMNS: Final[tuple[str, ...]] = (
    "arch",
    "activation",
    "init",
    "norm",
    "residual",
    "depth",
    "width",
    "optimizer",
    "lr",
    "clip_value",
    "dataset",
    "seed",
)

# runs.finding_kinds holds every finding kind at most once: room for all of them, delimited, and new ones.
FINDING_KINDS_LENGTH: Final = 400

# Named constraints: PostgreSQL and alembic's SQLite batch mode both need names to alter them later.
NAMING_CONVENTION: Final[dict[str, str]] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def stamp(prefix: str) -> dict[str, Any]:
    """Values of the `<prefix>_at` and `<prefix>_epoch` columns for the present instant."""
    now = time.time()
    return {f"{prefix}_at": datetime.fromtimestamp(now, UTC), f"{prefix}_epoch": now}


class UTCDateTime(TypeDecorator[datetime]):
    """DateTime(timezone=True) that always hands back aware UTC datetimes.

    SQLite keeps no offset, so without this the same column reads naive there and aware on PostgreSQL.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: store timezone-aware UTC times only")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base carrying the naming convention and the Python → SQL type map."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute as is
        dict[str, Any]: JSON(none_as_null=True),
        datetime: UTCDateTime(),
    }


class Sweep(Base):
    """A grid of specs submitted together; each grid point is one run."""

    __tablename__ = "sweeps"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    base: Mapped[dict[str, Any]] = mapped_column(doc="Spec fields shared by every grid point.")
    grid: Mapped[dict[str, Any]] = mapped_column(doc="Spec field → list of values.")
    size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime]
    created_epoch: Mapped[float] = mapped_column(Float)
    name: Mapped[str | None] = mapped_column(String(200), doc="A name for the sweep (editable).")
    tags: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True), doc="Labels to find it by (editable).")


class Run(Base):
    """One probe: its spec, its place in the queue and, once succeeded, its verdict."""

    __tablename__ = "runs"
    __table_args__ = (
        CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name="status"),
        CheckConstraint("source IN ('probe', 'external')", name="source"),
        # A probe run has its spec; an external run (an uploaded report) its model description instead.
        CheckConstraint(
            "(source = 'probe' AND spec IS NOT NULL) OR (source = 'external' AND model IS NOT NULL)", name="origin"
        ),
        # The queue's claim scans queued runs oldest first.
        Index("ix_runs_queue", "status", "created_epoch"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    source: Mapped[str] = mapped_column(
        String(16),
        index=True,
        server_default="probe",
        doc="probe (a spec graddiag trained) or external (an uploaded report of a model graddiag did not build).",
    )
    # The spec and its columns are NULL for an external run, which has `model` instead (the origin check
    # constraint). Their Python types stay those of a probe run's: only code that checked `source` (or reads
    # runs that are probes by construction: a sweep's, a claimed one) reads them.
    spec: Mapped[dict[str, Any]] = mapped_column(nullable=True)
    spec_hash: Mapped[str] = mapped_column(String(64), index=True, nullable=True)
    model: Mapped[dict[str, Any] | None] = mapped_column(doc="An external run's model description.")
    name: Mapped[str | None] = mapped_column(String(200), doc="The uploader's name for an external run.")
    tags: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True), doc="The uploader's tags.")

    arch: Mapped[str] = mapped_column(String(16), index=True, nullable=True)
    activation: Mapped[str] = mapped_column(String(32), index=True, nullable=True)
    init: Mapped[str] = mapped_column(String(32), index=True, nullable=True)
    norm: Mapped[str] = mapped_column(String(16), index=True, nullable=True)
    residual: Mapped[bool] = mapped_column(index=True, nullable=True)
    depth: Mapped[int] = mapped_column(index=True, nullable=True)
    width: Mapped[int] = mapped_column(index=True, nullable=True)
    optimizer: Mapped[str] = mapped_column(String(16), index=True, nullable=True)
    lr: Mapped[float] = mapped_column(Float, index=True, nullable=True)
    clip_value: Mapped[float | None] = mapped_column(Float, index=True)
    dataset: Mapped[str] = mapped_column(String(16), index=True, nullable=True)
    seed: Mapped[int] = mapped_column(index=True, nullable=True)

    status: Mapped[str] = mapped_column(String(16), index=True)
    verdict: Mapped[str | None] = mapped_column(String(16), index=True, doc="The verdict's label.")
    evidence: Mapped[dict[str, Any] | None] = mapped_column(doc="Verdict evidence (numbers).")
    verdict_detail: Mapped[dict[str, Any] | None] = mapped_column(
        doc="The rest of the verdict: at_init, trained, reasons, advice, theory."
    )
    eval_result: Mapped[dict[str, Any] | None]
    timing: Mapped[dict[str, Any] | None]
    finding_kinds: Mapped[str | None] = mapped_column(
        String(FINDING_KINDS_LENGTH),
        doc="The verdict's distinct finding kinds as ',kind_a,kind_b,' (sorted; ',' for none); NULL until the "
        "run succeeded. Written with the verdict in one UPDATE (store.runs.report_columns), so it always "
        "agrees with verdict_detail's findings. Filtered with LIKE '%,kind,%', which works alike on SQLite "
        "and PostgreSQL; no index, since a leading wildcard cannot use one and the scan stays cheap beside "
        "the listing's own.",
    )
    progress: Mapped[dict[str, Any] | None] = mapped_column(
        doc="step, steps, loss, label_so_far, updated_at while running."
    )
    error: Mapped[str | None] = mapped_column(Text)

    attempt: Mapped[int] = mapped_column(default=0, doc="Claims so far; a fencing token for results.")
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_epoch: Mapped[float | None] = mapped_column(Float)
    cancel_requested: Mapped[bool] = mapped_column(default=False)

    created_at: Mapped[datetime]
    created_epoch: Mapped[float] = mapped_column(Float)
    started_at: Mapped[datetime | None]
    started_epoch: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[datetime | None] = mapped_column(index=True)
    finished_epoch: Mapped[float | None] = mapped_column(Float)

    sweep_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("sweeps.id", ondelete="CASCADE"), index=True)
    grid: Mapped[dict[str, Any] | None] = mapped_column(doc="This run's grid point in its sweep.")
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)


class RunLayer(Base):
    """A parameterised layer of a run's network (the report's LayerInfo)."""

    __tablename__ = "run_layers"

    run_id: Mapped[str] = mapped_column(String(32), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    params: Mapped[int]
    structural_zero_bias: Mapped[bool] = mapped_column(default=False, server_default=false())


class RunStep(Base):
    """Whole-model figures of one optimizer step (the report's StepMetrics)."""

    __tablename__ = "run_steps"

    run_id: Mapped[str] = mapped_column(String(32), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    loss: Mapped[float | None] = mapped_column(Float)
    accuracy: Mapped[float | None] = mapped_column(Float)
    grad_norm_total_pre: Mapped[float | None] = mapped_column(Float)
    grad_norm_total_post: Mapped[float | None] = mapped_column(Float)


class RunRecord(Base):
    """Per-layer statistics at one recorded step (the report's LayerRecord)."""

    __tablename__ = "run_records"
    __table_args__ = (Index("ix_run_records_layer", "run_id", "layer", "step"),)

    run_id: Mapped[str] = mapped_column(String(32), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    layer: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    grad_norm: Mapped[float | None] = mapped_column(Float)
    bias_grad_norm: Mapped[float | None] = mapped_column(Float)
    weight_norm: Mapped[float | None] = mapped_column(Float)
    rel_grad: Mapped[float | None] = mapped_column(Float)
    update_ratio: Mapped[float | None] = mapped_column(Float)
    act_grad_norm: Mapped[float | None] = mapped_column(Float)
    zero_grad_frac: Mapped[float | None] = mapped_column(Float)
    saturation_frac: Mapped[float | None] = mapped_column(Float)
    act_norm: Mapped[float | None] = mapped_column(Float)
    penalty_grad_norm: Mapped[float | None] = mapped_column(Float)


class RunTimeRecord(Base):
    """One recurrent layer at one time step of one recorded step: the gradient through time (the report's
    TimeRecord). The primary key is the order readers want, one run's rows by step, layer and t; the layer
    index serves one layer's t × step heatmap."""

    __tablename__ = "run_time_records"
    __table_args__ = (Index("ix_run_time_records_layer", "run_id", "layer", "step", "t"),)

    run_id: Mapped[str] = mapped_column(String(32), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    layer: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    t: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    grad_norm: Mapped[float | None] = mapped_column(Float)
    cell_grad_norm: Mapped[float | None] = mapped_column(Float)
    state_rms: Mapped[float | None] = mapped_column(Float)
    gate_mean: Mapped[float | None] = mapped_column(Float)
    saturation_frac: Mapped[float | None] = mapped_column(Float)
