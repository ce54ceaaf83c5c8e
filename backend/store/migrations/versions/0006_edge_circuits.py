"""Edge circuits and edge sweeps (issue 12), and the jobs that made them.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "edge_circuits",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("params_hash", sa.String(64), nullable=False),
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("models.id", ondelete="CASCADE"), nullable=False),
        sa.Column("dataset_id", sa.Integer(), sa.ForeignKey("datasets.id", ondelete="SET NULL"), nullable=True),
        sa.Column("task", sa.String(50), nullable=False),
        sa.Column("method", sa.String(50), nullable=False),
        sa.Column("n_prompts", sa.Integer(), nullable=False),
        sa.Column("n_edges", sa.Integer(), nullable=False),
        sa.Column("n_kept", sa.Integer(), nullable=False),
        sa.Column("sparsity", sa.Float(), nullable=False),
        sa.Column("kl_mean", sa.Float(), nullable=False),
        sa.Column("kl_ci_low", sa.Float(), nullable=False),
        sa.Column("kl_ci_high", sa.Float(), nullable=False),
        sa.Column("recovered", sa.Float(), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("params_hash", name="uq_edge_circuits_params_hash"),
    )
    op.create_index("ix_edge_circuits_dataset_id", "edge_circuits", ["dataset_id"])
    op.create_index("ix_edge_circuits_model_task_method", "edge_circuits", ["model_id", "task", "method"])
    op.create_table(
        "edge_sweeps",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("params_hash", sa.String(64), nullable=False),
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("models.id", ondelete="CASCADE"), nullable=False),
        sa.Column("dataset_id", sa.Integer(), sa.ForeignKey("datasets.id", ondelete="SET NULL"), nullable=True),
        sa.Column("task", sa.String(50), nullable=False),
        sa.Column("methods", sa.JSON(), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("n_prompts", sa.Integer(), nullable=False),
        sa.Column("n_edges", sa.Integer(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("params_hash", name="uq_edge_sweeps_params_hash"),
    )
    op.create_index("ix_edge_sweeps_dataset_id", "edge_sweeps", ["dataset_id"])
    op.create_index("ix_edge_sweeps_model_task", "edge_sweeps", ["model_id", "task"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("edge_circuit_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("edge_sweep_id", sa.Integer(), nullable=True))
        batch.create_foreign_key("fk_jobs_edge_circuit_id_edge_circuits", "edge_circuits",
                                 ["edge_circuit_id"], ["id"], ondelete="SET NULL")
        batch.create_foreign_key("fk_jobs_edge_sweep_id_edge_sweeps", "edge_sweeps",
                                 ["edge_sweep_id"], ["id"], ondelete="SET NULL")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("fk_jobs_edge_sweep_id_edge_sweeps", type_="foreignkey")
        batch.drop_constraint("fk_jobs_edge_circuit_id_edge_circuits", type_="foreignkey")
        batch.drop_column("edge_sweep_id")
        batch.drop_column("edge_circuit_id")
    op.drop_table("edge_sweeps")
    op.drop_table("edge_circuits")
