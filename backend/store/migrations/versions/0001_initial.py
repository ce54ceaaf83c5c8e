"""The initial store: models, transcoders, datasets, jobs, circuits, sweeps, features,
examples, explanations (with revisions and scores) and annotations.

Revision ID: 0001
Revises:
Create Date: 2025-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def _id() -> sa.Column:
    return sa.Column("id", sa.Integer(), primary_key=True)


def _fk(column: str, target: str, ondelete: str, nullable: bool = False) -> sa.Column:
    return sa.Column(column, sa.Integer(), sa.ForeignKey(f"{target}.id", ondelete=ondelete), nullable=nullable)


def _metric_columns() -> list[sa.Column]:
    """The KL statistics shared by circuits and sweep points."""
    return [
        sa.Column("kl_mean", sa.Float(), nullable=False),
        sa.Column("kl_std", sa.Float(), nullable=False),
        sa.Column("kl_ci_low", sa.Float(), nullable=False),
        sa.Column("kl_ci_high", sa.Float(), nullable=False),
        sa.Column("pred_change_rate", sa.Float(), nullable=False),
        sa.Column("faithfulness_mean", sa.Float(), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "models", _id(),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("architecture", sa.String(50), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("name", name="uq_models_name"),
    )
    op.create_table(
        "transcoders", _id(),
        sa.Column("name", sa.String(200), nullable=False),
        _fk("model_id", "models", "CASCADE"),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("n_layers", sa.Integer(), nullable=False),
        sa.Column("d_model", sa.Integer(), nullable=False),
        sa.Column("n_features", sa.Integer(), nullable=False),
        sa.Column("activation", sa.String(20), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("name", name="uq_transcoders_name"),
    )
    op.create_index("ix_transcoders_model_id", "transcoders", ["model_id"])
    op.create_table(
        "datasets", _id(),
        sa.Column("params_hash", sa.String(64), nullable=False),
        _fk("model_id", "models", "CASCADE"),
        sa.Column("task", sa.String(50), nullable=False),
        sa.Column("task_options", sa.JSON(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("pairs", sa.JSON(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("params_hash", name="uq_datasets_params_hash"),
    )
    op.create_index("ix_datasets_model_id", "datasets", ["model_id"])
    op.create_index("ix_datasets_task", "datasets", ["task"])
    op.create_table(
        "circuits", _id(),
        sa.Column("params_hash", sa.String(64), nullable=False),
        _fk("model_id", "models", "CASCADE"),
        _fk("transcoder_id", "transcoders", "CASCADE"),
        _fk("dataset_id", "datasets", "SET NULL", nullable=True),
        sa.Column("task", sa.String(50), nullable=False),
        sa.Column("method", sa.String(50), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("budget", sa.String(30), nullable=False),
        sa.Column("corruption", sa.String(50), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("n_prompts", sa.Integer(), nullable=False),
        sa.Column("prompts", sa.JSON(), nullable=False),
        sa.Column("features", sa.JSON(), nullable=False),
        *_metric_columns(),
        sa.Column("completeness_mean", sa.Float(), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("cost", sa.JSON(), nullable=False),
        sa.Column("graphs", sa.JSON(), nullable=True),
        sa.Column("graph_keys", sa.JSON(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("params_hash", name="uq_circuits_params_hash"),
    )
    op.create_index("ix_circuits_transcoder_id", "circuits", ["transcoder_id"])
    op.create_index("ix_circuits_dataset_id", "circuits", ["dataset_id"])
    op.create_index("ix_circuits_model_task_method_k", "circuits", ["model_id", "task", "method", "k"])
    op.create_index("ix_circuits_task_method_k", "circuits", ["task", "method", "k"])
    op.create_table(
        "sweeps", _id(),
        sa.Column("params_hash", sa.String(64), nullable=False),
        _fk("model_id", "models", "CASCADE"),
        _fk("transcoder_id", "transcoders", "CASCADE"),
        _fk("dataset_id", "datasets", "SET NULL", nullable=True),
        sa.Column("task", sa.String(50), nullable=False),
        sa.Column("corruption", sa.String(50), nullable=False),
        sa.Column("methods", sa.JSON(), nullable=False),
        sa.Column("ks", sa.JSON(), nullable=False),
        sa.Column("n_prompts", sa.Integer(), nullable=False),
        sa.Column("kl_none_mean", sa.Float(), nullable=False),
        sa.Column("n_active_mean", sa.Float(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("params_hash", name="uq_sweeps_params_hash"),
    )
    op.create_index("ix_sweeps_transcoder_id", "sweeps", ["transcoder_id"])
    op.create_index("ix_sweeps_dataset_id", "sweeps", ["dataset_id"])
    op.create_index("ix_sweeps_model_task", "sweeps", ["model_id", "task"])
    op.create_table(
        "sweep_points", _id(),
        _fk("sweep_id", "sweeps", "CASCADE"),
        sa.Column("method", sa.String(50), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("is_random", sa.Boolean(), nullable=False),
        *_metric_columns(),
        sa.Column("n_prompts", sa.Integer(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("patched_forwards", sa.Integer(), nullable=False),
        sa.Column("kl_all_mean", sa.Float(), nullable=True),
        sa.Column("completeness_mean", sa.Float(), nullable=True),
    )
    op.create_index("ix_sweep_points_sweep_id_method_k", "sweep_points", ["sweep_id", "method", "k"])
    op.create_table(
        "jobs", _id(),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("params_hash", sa.String(64), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("device", sa.String(50), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        _fk("circuit_id", "circuits", "SET NULL", nullable=True),
        _fk("sweep_id", "sweeps", "SET NULL", nullable=True),
        sa.CheckConstraint("status IN ('queued', 'running', 'done', 'failed', 'cancelled')", name="status"),
        sa.CheckConstraint("progress >= 0 AND progress <= 1", name="progress"),
        sa.UniqueConstraint("params_hash", name="uq_jobs_params_hash"),
    )
    op.create_index("ix_jobs_kind", "jobs", ["kind"])
    op.create_index("ix_jobs_status_created_at", "jobs", ["status", "created_at"])
    op.create_table(
        "features", _id(),
        _fk("model_id", "models", "CASCADE"),
        _fk("transcoder_id", "transcoders", "CASCADE"),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("statistics", sa.JSON(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("transcoder_id", "layer", "index", name="uq_features_transcoder_id_layer_index"),
    )
    op.create_index("ix_features_model_id", "features", ["model_id"])
    op.create_table(
        "examples", _id(),
        _fk("feature_id", "features", "CASCADE"),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("tokens", sa.JSON(), nullable=False),
        sa.Column("activations", sa.JSON(), nullable=False),
        sa.Column("max_activation", sa.Float(), nullable=False),
        sa.Column("source", sa.String(200), nullable=False),
    )
    op.create_index("ix_examples_feature_id_rank", "examples", ["feature_id", "rank"])
    op.create_table(
        "explanations", _id(),
        _fk("feature_id", "features", "CASCADE"),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("source", sa.String(20), nullable=False),
        sa.Column("author", sa.String(200), nullable=False),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.CheckConstraint("source IN ('llm', 'offline', 'human')", name="source"),
    )
    op.create_index("ix_explanations_feature_id", "explanations", ["feature_id"])
    op.create_table(
        "explanation_revisions", _id(),
        _fk("explanation_id", "explanations", "CASCADE"),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("source", sa.String(20), nullable=False),
        sa.Column("author", sa.String(200), nullable=False),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("explanation_id", "revision", name="uq_explanation_revisions_explanation_id_revision"),
    )
    op.create_table(
        "explanation_scores", _id(),
        _fk("explanation_id", "explanations", "CASCADE"),
        sa.Column("metric", sa.String(50), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("rater", sa.String(200), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_explanation_scores_explanation_id_metric", "explanation_scores",
                    ["explanation_id", "metric"])
    op.create_table(
        "annotations", _id(),
        _fk("explanation_id", "explanations", "CASCADE", nullable=True),
        _fk("feature_id", "features", "CASCADE", nullable=True),
        sa.Column("rating", sa.Integer(), nullable=True),
        sa.Column("label", sa.String(200), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("author", sa.String(200), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.CheckConstraint("rating IS NULL OR rating IN (0, 1, 2)", name="rating"),
        sa.CheckConstraint("explanation_id IS NOT NULL OR feature_id IS NOT NULL", name="target"),
    )
    op.create_index("ix_annotations_explanation_id", "annotations", ["explanation_id"])
    op.create_index("ix_annotations_feature_id", "annotations", ["feature_id"])


def downgrade() -> None:
    # Children before parents; dropping a table drops its indexes on every backend.
    for table in ("annotations", "explanation_scores", "explanation_revisions", "explanations",
                  "examples", "features", "jobs", "sweep_points", "sweeps", "circuits", "datasets",
                  "transcoders", "models"):
        op.drop_table(table)
