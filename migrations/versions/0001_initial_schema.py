"""Initial schema: sweeps, runs and the tidy per-run report tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

# Filterable spec columns and other single-column indexes on runs (named ix_runs_<column>).
RUN_INDEXED_COLUMNS = (
    "activation",
    "arch",
    "clip_value",
    "dataset",
    "depth",
    "finished_at",
    "init",
    "lr",
    "norm",
    "optimizer",
    "residual",
    "seed",
    "spec_hash",
    "status",
    "sweep_id",
    "verdict",
    "width",
)


def _json() -> sa.JSON:
    return sa.JSON(none_as_null=True)


def _run_fk(table: str) -> sa.ForeignKeyConstraint:
    # Child rows go with their run: deleting a run (or a sweep's runs) removes its report rows.
    return sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f(f"fk_{table}_run_id_runs"), ondelete="CASCADE")


def upgrade() -> None:
    op.create_table(
        "sweeps",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("base", _json(), nullable=False),
        sa.Column("grid", _json(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_epoch", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sweeps")),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("spec", _json(), nullable=False),
        sa.Column("spec_hash", sa.String(length=64), nullable=False),
        sa.Column("arch", sa.String(length=16), nullable=False),
        sa.Column("activation", sa.String(length=32), nullable=False),
        sa.Column("init", sa.String(length=32), nullable=False),
        sa.Column("norm", sa.String(length=16), nullable=False),
        sa.Column("residual", sa.Boolean(), nullable=False),
        sa.Column("depth", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("optimizer", sa.String(length=16), nullable=False),
        sa.Column("lr", sa.Float(), nullable=False),
        sa.Column("clip_value", sa.Float(), nullable=True),
        sa.Column("dataset", sa.String(length=16), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=True),
        sa.Column("evidence", _json(), nullable=True),
        sa.Column("verdict_detail", _json(), nullable=True),
        sa.Column("eval_result", _json(), nullable=True),
        sa.Column("timing", _json(), nullable=True),
        sa.Column("progress", _json(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=200), nullable=True),
        sa.Column("lease_expires_epoch", sa.Float(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_epoch", sa.Float(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_epoch", sa.Float(), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_epoch", sa.Float(), nullable=True),
        sa.Column("sweep_id", sa.String(length=32), nullable=True),
        sa.Column("grid", _json(), nullable=True),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')",
            name=op.f("ck_runs_status"),
        ),
        sa.ForeignKeyConstraint(["sweep_id"], ["sweeps.id"], name=op.f("fk_runs_sweep_id_sweeps"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_runs_idempotency_key")),
    )
    for column in RUN_INDEXED_COLUMNS:
        op.create_index(op.f(f"ix_runs_{column}"), "runs", [column])
    op.create_index("ix_runs_queue", "runs", ["status", "created_epoch"])

    op.create_table(
        "run_layers",
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("index", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("params", sa.Integer(), nullable=False),
        _run_fk("run_layers"),
        sa.PrimaryKeyConstraint("run_id", "index", name=op.f("pk_run_layers")),
    )
    op.create_table(
        "run_steps",
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("step", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("accuracy", sa.Float(), nullable=True),
        sa.Column("grad_norm_total_pre", sa.Float(), nullable=True),
        sa.Column("grad_norm_total_post", sa.Float(), nullable=True),
        _run_fk("run_steps"),
        sa.PrimaryKeyConstraint("run_id", "step", name=op.f("pk_run_steps")),
    )
    op.create_table(
        "run_records",
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("step", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("layer", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("grad_norm", sa.Float(), nullable=True),
        sa.Column("bias_grad_norm", sa.Float(), nullable=True),
        sa.Column("weight_norm", sa.Float(), nullable=True),
        sa.Column("rel_grad", sa.Float(), nullable=True),
        sa.Column("update_ratio", sa.Float(), nullable=True),
        sa.Column("act_grad_norm", sa.Float(), nullable=True),
        sa.Column("zero_grad_frac", sa.Float(), nullable=True),
        sa.Column("saturation_frac", sa.Float(), nullable=True),
        _run_fk("run_records"),
        sa.PrimaryKeyConstraint("run_id", "step", "layer", name=op.f("pk_run_records")),
    )
    op.create_index("ix_run_records_layer", "run_records", ["run_id", "layer", "step"])


def downgrade() -> None:
    # Dropping a table drops its indexes; children first for the foreign keys.
    for table in ("run_records", "run_steps", "run_layers", "runs", "sweeps"):
        op.drop_table(table)
