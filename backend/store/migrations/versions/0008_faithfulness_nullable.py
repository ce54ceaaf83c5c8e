"""A circuit's or sweep point's faithfulness mean may be undefined (NULL).

Faithfulness is (M_circuit - M_none) / (M_clean - M_none) per prompt; when M_clean = M_none on
every prompt no ratio is defined and the mean is None. The column was NOT NULL, so such a job
failed when it was stored, after all its compute.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TABLES = ("circuits", "sweep_points")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.alter_column("faithfulness_mean", existing_type=sa.Float(), nullable=True)


def downgrade() -> None:
    for table in TABLES:
        # NOT NULL cannot hold an undefined mean: such rows go (their jobs run again on request).
        op.execute(sa.text(f"DELETE FROM {table} WHERE faithfulness_mean IS NULL"))
        with op.batch_alter_table(table) as batch:
            batch.alter_column("faithfulness_mean", existing_type=sa.Float(), nullable=False)
