"""HAGD hierarchies: a table of HAGD results, and the job that made one points at it.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hierarchies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("params_hash", sa.String(64), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("transcoder_id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=True),
        sa.Column("task", sa.String(50), nullable=False),
        sa.Column("n_prompts", sa.Integer(), nullable=False),
        sa.Column("levels", sa.JSON(), nullable=False),
        sa.Column("circuit_size", sa.Integer(), nullable=False),
        sa.Column("sufficiency_mean", sa.Float(), nullable=False),
        sa.Column("sufficiency_std", sa.Float(), nullable=False),
        sa.Column("necessity_mean", sa.Float(), nullable=False),
        sa.Column("necessity_std", sa.Float(), nullable=False),
        sa.Column("evaluations", sa.Integer(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name="fk_hierarchies_model_id_models", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["transcoder_id"], ["transcoders.id"], name="fk_hierarchies_transcoder_id_transcoders",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], name="fk_hierarchies_dataset_id_datasets",
                                ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name="pk_hierarchies"),
        sa.UniqueConstraint("params_hash", name="uq_hierarchies_params_hash"),
    )
    op.create_index("ix_hierarchies_model_task", "hierarchies", ["model_id", "task"])
    op.create_index("ix_hierarchies_transcoder_id", "hierarchies", ["transcoder_id"])
    op.create_index("ix_hierarchies_dataset_id", "hierarchies", ["dataset_id"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("hierarchy_id", sa.Integer(), nullable=True))
        batch.create_foreign_key("fk_jobs_hierarchy_id_hierarchies", "hierarchies", ["hierarchy_id"], ["id"],
                                 ondelete="SET NULL")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("fk_jobs_hierarchy_id_hierarchies", type_="foreignkey")
        batch.drop_column("hierarchy_id")
    op.drop_index("ix_hierarchies_dataset_id", "hierarchies")
    op.drop_index("ix_hierarchies_transcoder_id", "hierarchies")
    op.drop_index("ix_hierarchies_model_task", "hierarchies")
    op.drop_table("hierarchies")
