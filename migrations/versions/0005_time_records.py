"""The gradient through time: one row per (recorded step, recurrent layer, time step) of a recurrent run.

`run_time_records` holds the report's `time_records` (engine.report.TimeRecord) as a tidy table, its
columns named after the model's fields like the other report tables. The primary key (run_id, step,
layer, t) is also the order every reader wants ("one run's rows by step, layer, t"); a second index
(run_id, layer, step, t) serves one layer's rows, the t × step heatmap of a layer. Rows go with their run
(ON DELETE CASCADE). Runs stored before this revision have none, as mlp, cnn and transformer runs never do.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None


def upgrade() -> None:
    op.create_table(
        "run_time_records",
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("step", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("layer", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("t", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("grad_norm", sa.Float(), nullable=True),
        sa.Column("cell_grad_norm", sa.Float(), nullable=True),
        sa.Column("state_rms", sa.Float(), nullable=True),
        sa.Column("gate_mean", sa.Float(), nullable=True),
        sa.Column("saturation_frac", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_run_time_records_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "step", "layer", "t", name=op.f("pk_run_time_records")),
    )
    op.create_index("ix_run_time_records_layer", "run_time_records", ["run_id", "layer", "step", "t"])


def downgrade() -> None:
    # Dropping the table drops its index.
    op.drop_table("run_time_records")
