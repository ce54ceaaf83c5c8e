"""Circuits imported from attribution-graph files have no measured metrics (nullable columns).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

COLUMNS = ("kl_mean", "kl_std", "kl_ci_low", "kl_ci_high", "pred_change_rate", "faithfulness_mean")


def upgrade() -> None:
    with op.batch_alter_table("circuits") as batch:
        for name in COLUMNS:
            batch.alter_column(name, existing_type=sa.Float(), nullable=True)


def downgrade() -> None:
    # Imported circuits cannot satisfy NOT NULL metrics: they go with the revision.
    op.execute("DELETE FROM circuits WHERE method = 'imported'")
    with op.batch_alter_table("circuits") as batch:
        for name in COLUMNS:
            batch.alter_column(name, existing_type=sa.Float(), nullable=False)
