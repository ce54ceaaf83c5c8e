"""Edge circuits keep their heads' attention patterns on the first prompts (issue 14).

A nullable JSON column: circuits stored before it have none (the dashboard says so).

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("edge_circuits") as batch:
        batch.add_column(sa.Column("attention", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("edge_circuits") as batch:
        batch.drop_column("attention")
