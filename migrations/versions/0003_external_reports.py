"""External reports: runs of models graddiag did not build (graddiag.diagnose / watch, POST /v1/reports).

`runs.source` is `probe` (a spec graddiag trained; every run before this revision) or `external` (an
uploaded report). An external run has no spec: the spec JSON, its hash and the spec columns become
nullable and stay NULL there, and `runs.model` holds the report's model description instead (class name,
parameter count, optimizer, branches, ...). `name` and `tags` are the uploader's label for it. A check
constraint keeps each run's origin whole: a probe run has a spec, an external run a model description.

The downgrade cannot keep external runs (the spec columns become NOT NULL again): it deletes them and
their report rows.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

# The columns that describe a spec, NOT NULL before this revision (clip_value always was nullable).
SPEC_COLUMNS: dict[str, sa.types.TypeEngine[Any]] = {
    "spec": sa.JSON(none_as_null=True),
    "spec_hash": sa.String(length=64),
    "arch": sa.String(length=16),
    "activation": sa.String(length=32),
    "init": sa.String(length=32),
    "norm": sa.String(length=16),
    "residual": sa.Boolean(),
    "depth": sa.Integer(),
    "width": sa.Integer(),
    "optimizer": sa.String(length=16),
    "lr": sa.Float(),
    "dataset": sa.String(length=16),
    "seed": sa.Integer(),
}
ORIGIN = "(source = 'probe' AND spec IS NOT NULL) OR (source = 'external' AND model IS NOT NULL)"


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("source", sa.String(length=16), server_default="probe", nullable=False))
        batch.add_column(sa.Column("model", sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column("name", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("tags", sa.JSON(none_as_null=True), nullable=True))
        for column, type_ in SPEC_COLUMNS.items():
            batch.alter_column(column, existing_type=type_, nullable=True)
        batch.create_check_constraint(op.f("ck_runs_source"), "source IN ('probe', 'external')")
        batch.create_check_constraint(op.f("ck_runs_origin"), ORIGIN)
        batch.create_index(op.f("ix_runs_source"), ["source"])


def downgrade() -> None:
    runs = sa.table("runs", sa.column("id", sa.String()), sa.column("source", sa.String()))
    external = sa.select(runs.c.id).where(runs.c.source == "external").scalar_subquery()
    # Explicitly: migrations may run with foreign keys off (SQLite's batch mode), so no cascade would follow.
    for child in ("run_records", "run_steps", "run_layers"):
        table = sa.table(child, sa.column("run_id", sa.String()))
        op.execute(table.delete().where(table.c.run_id.in_(external)))
    op.execute(runs.delete().where(runs.c.source == "external"))
    with op.batch_alter_table("runs") as batch:
        batch.drop_index(op.f("ix_runs_source"))
        batch.drop_constraint(op.f("ck_runs_origin"), type_="check")
        batch.drop_constraint(op.f("ck_runs_source"), type_="check")
        for column, type_ in SPEC_COLUMNS.items():
            batch.alter_column(column, existing_type=type_, nullable=False)
        batch.drop_column("tags")
        batch.drop_column("name")
        batch.drop_column("model")
        batch.drop_column("source")
