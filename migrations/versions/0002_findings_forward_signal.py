"""Findings and honest records: forward-signal RMS and penalty gradients per record, structurally-zero
bias layers, and the finding kinds of each run (filterable).

`runs.finding_kinds` holds the distinct kinds of the verdict's findings as `,kind_a,kind_b,` (sorted,
with a delimiter at both ends, so `LIKE '%,kind,%'` matches one whole kind on SQLite and PostgreSQL
alike); `,` for a verdict without findings and NULL for a run without a report (not succeeded). The
upgrade fills it for runs that already succeeded from the findings in their stored verdict (reports
written before this revision have none, so they get `,`).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

# The back-fill reads this many succeeded runs' verdicts at a time, so a large store is not loaded whole.
_BATCH = 500


def _kinds(detail: Any) -> str:
    # The same encoding as graddiag.service.store.runs.encode_finding_kinds, spelt out here because a
    # migration must keep doing what it did when it was written, whatever the application code becomes.
    findings = detail.get("findings") if isinstance(detail, dict) else None
    kinds = sorted({item["kind"] for item in findings or [] if isinstance(item, dict) and item.get("kind")})
    return "".join(f",{kind}" for kind in kinds) + ","


def _backfill_finding_kinds() -> None:
    runs = sa.table(
        "runs",
        sa.column("id", sa.String()),
        sa.column("status", sa.String()),
        sa.column("verdict_detail", sa.JSON()),
        sa.column("finding_kinds", sa.String()),
    )
    connection = op.get_bind()
    after = ""
    while True:
        # Keyset pages over the primary key: stable while the rows of earlier pages are updated.
        page = connection.execute(
            sa.select(runs.c.id, runs.c.verdict_detail)
            .where(runs.c.status == "succeeded", runs.c.id > after)
            .order_by(runs.c.id)
            .limit(_BATCH)
        ).all()
        if not page:
            return
        for run_id, detail in page:
            connection.execute(runs.update().where(runs.c.id == run_id).values(finding_kinds=_kinds(detail)))
        after = page[-1][0]


def upgrade() -> None:
    with op.batch_alter_table("run_records") as batch:
        batch.add_column(sa.Column("act_norm", sa.Float(), nullable=True))
        batch.add_column(sa.Column("penalty_grad_norm", sa.Float(), nullable=True))
    with op.batch_alter_table("run_layers") as batch:
        # Existing layers were recorded before the flag existed: false, as the report model defaults it.
        batch.add_column(sa.Column("structural_zero_bias", sa.Boolean(), server_default=sa.false(), nullable=False))
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("finding_kinds", sa.String(length=400), nullable=True))
    _backfill_finding_kinds()


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("finding_kinds")
    with op.batch_alter_table("run_layers") as batch:
        batch.drop_column("structural_zero_bias")
    with op.batch_alter_table("run_records") as batch:
        batch.drop_column("penalty_grad_norm")
        batch.drop_column("act_norm")
