"""PIEscope's store as SQLAlchemy 2 typed mappings (one class per table).

Portable by construction: generic types only (JSON, not SQLite's JSON1 or PostgreSQL's JSONB),
so the same schema runs on SQLite (the default) and PostgreSQL (by URL). The hand-written
Alembic revisions in `backend/store/migrations/versions/` create exactly these tables; `tests/test_store.py`
checks that the two never drift apart.

Naming: every constraint and index has an explicit, stable name (see `NAMING`), so migrations
can drop them by name on every backend.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, Boolean, CheckConstraint, DateTime, Float, ForeignKey, Index, MetaData, String, Text,
                        TypeDecorator, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JOB_STATUSES = ("queued", "running", "done", "failed", "cancelled")
JOB_KINDS = ("prune", "sweep", "graph", "explain", "score", "edges", "edge-sweep", "hagd")
EXPLANATION_SOURCES = ("llm", "offline", "human")
# Integer columns (ids included) are 32-bit on PostgreSQL: the API accepts no id, layer, index or
# offset beyond this, so a lookup never overflows the driver.
MAX_DB_INT = 2**31 - 1


def utcnow() -> datetime:
    """Timezone-aware now, the default of every timestamp column."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timezone-aware timestamp on every backend: stored as UTC, read back with tzinfo=UTC.

    PostgreSQL keeps the zone itself; SQLite has no zone type and returns naive values, which
    are UTC because every write goes through here.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store keeps timezone-aware timestamps only")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class FiniteJSON(TypeDecorator):
    """JSON that every backend accepts: NaN and infinities are stored as null (PostgreSQL's JSON
    rejects the NaN token that Python's json writes; SQLite would keep a non-standard document)."""

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return _finite(value)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: FiniteJSON(), list[Any]: FiniteJSON(), float: Float(), datetime: UTCDateTime()}


class Model(Base):
    """A language model known by name (registry name or models_cache/<name>/model)."""

    __tablename__ = "models"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    architecture: Mapped[str] = mapped_column(String(50), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Transcoder(Base):
    """A transcoder named `<model>/<dir>` (models_cache/<model>/<dir>/config.yaml)."""

    __tablename__ = "transcoders"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(10), default="clt")
    n_layers: Mapped[int] = mapped_column(default=0)
    d_model: Mapped[int] = mapped_column(default=0)
    n_features: Mapped[int] = mapped_column(default=0)
    activation: Mapped[str] = mapped_column(String(20), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    model: Mapped[Model] = relationship()


class Dataset(Base):
    """The prompt pairs a job ran on: task + options + n + seed, tokenised by one model.

    pairs: [{"clean", "corrupted", "answer", "distractors"}] as kept after tokenisation.
    """

    __tablename__ = "datasets"
    id: Mapped[int] = mapped_column(primary_key=True)
    params_hash: Mapped[str] = mapped_column(String(64), unique=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    task: Mapped[str] = mapped_column(String(50), index=True)
    task_options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    n: Mapped[int]
    seed: Mapped[int] = mapped_column(default=0)
    pairs: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    """A unit of heavy work. params_hash (sha256 of the normalised params) is unique: the same
    request maps to the same row, so a finished result is served instead of recomputed."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("status", JOB_STATUSES), name="status"),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress"),
        Index("ix_jobs_status_created_at", "status", "created_at"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20), index=True)
    params: Mapped[dict[str, Any]]
    params_hash: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(20), default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text)
    device: Mapped[str] = mapped_column(String(50), default="cpu")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    circuit_id: Mapped[int | None] = mapped_column(ForeignKey("circuits.id", ondelete="SET NULL"))
    sweep_id: Mapped[int | None] = mapped_column(ForeignKey("sweeps.id", ondelete="SET NULL"))
    edge_circuit_id: Mapped[int | None] = mapped_column(ForeignKey("edge_circuits.id", ondelete="SET NULL"))
    edge_sweep_id: Mapped[int | None] = mapped_column(ForeignKey("edge_sweeps.id", ondelete="SET NULL"))
    hierarchy_id: Mapped[int | None] = mapped_column(ForeignKey("hierarchies.id", ondelete="SET NULL"))


class Circuit(Base):
    """A pruned circuit (backend.circuits.results.Circuit) and its attribution graphs.

    prompts: per-prompt kept occurrences (PromptCircuit JSON); features: AggregatedFeature JSON;
    graphs: {"all" | "<prompt index>" (+ "@logit" for logit targets):
    backend.circuits.graph_attribution.build_graph JSON}, null until a graph job ran (an imported
    graph file is a circuit of method "imported" whose metrics are None).
    revision: bumped by the ORM on every update (readers cache by it).
    """

    __tablename__ = "circuits"
    __table_args__ = (
        Index("ix_circuits_model_task_method_k", "model_id", "task", "method", "k"),
        Index("ix_circuits_task_method_k", "task", "method", "k"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    params_hash: Mapped[str] = mapped_column(String(64), unique=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    transcoder_id: Mapped[int] = mapped_column(ForeignKey("transcoders.id", ondelete="CASCADE"), index=True)
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), index=True)
    task: Mapped[str] = mapped_column(String(50))
    method: Mapped[str] = mapped_column(String(50))
    k: Mapped[int]
    budget: Mapped[str] = mapped_column(String(30))
    corruption: Mapped[str] = mapped_column(String(50))
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    n_prompts: Mapped[int]
    prompts: Mapped[list[Any]]
    features: Mapped[list[Any]]
    # None only for a circuit imported from a graph file (nothing was measured).
    kl_mean: Mapped[float | None]
    kl_std: Mapped[float | None]
    kl_ci_low: Mapped[float | None]
    kl_ci_high: Mapped[float | None]
    pred_change_rate: Mapped[float | None]
    faithfulness_mean: Mapped[float | None]  # also None when no prompt had M_clean != M_none
    completeness_mean: Mapped[float | None]
    seconds: Mapped[float]
    cost: Mapped[dict[str, Any]] = mapped_column(default=dict)
    graphs: Mapped[dict[str, Any] | None] = mapped_column(FiniteJSON())
    graph_keys: Mapped[list[Any]] = mapped_column(default=list)  # keys of `graphs`, for light listings
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revision: Mapped[int] = mapped_column(server_default="1")

    model: Mapped[Model] = relationship()
    transcoder: Mapped[Transcoder] = relationship()

    __mapper_args__ = {"version_id_col": revision}


class Sweep(Base):
    """A KL-vs-K sweep: its full SweepResult JSON plus one SweepPoint row per (method, K)."""

    __tablename__ = "sweeps"
    __table_args__ = (Index("ix_sweeps_model_task", "model_id", "task"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    params_hash: Mapped[str] = mapped_column(String(64), unique=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    transcoder_id: Mapped[int] = mapped_column(ForeignKey("transcoders.id", ondelete="CASCADE"), index=True)
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), index=True)
    task: Mapped[str] = mapped_column(String(50))
    corruption: Mapped[str] = mapped_column(String(50))
    methods: Mapped[list[Any]]
    ks: Mapped[list[Any]]
    n_prompts: Mapped[int]
    kl_none_mean: Mapped[float]
    n_active_mean: Mapped[float]
    seconds: Mapped[float]
    result: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    model: Mapped[Model] = relationship()
    transcoder: Mapped[Transcoder] = relationship()
    points: Mapped[list[SweepPoint]] = relationship(back_populates="sweep", cascade="all, delete-orphan",
                                                     order_by="SweepPoint.id")


class Hierarchy(Base):
    """A HAGD run (backend.hagd.pipeline.HagdResult): the hierarchy, the circuit, its verification.

    The headline numbers are columns for listings; `result` is the whole HagdResult JSON.
    """

    __tablename__ = "hierarchies"
    __table_args__ = (Index("ix_hierarchies_model_task", "model_id", "task"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    params_hash: Mapped[str] = mapped_column(String(64), unique=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    transcoder_id: Mapped[int] = mapped_column(ForeignKey("transcoders.id", ondelete="CASCADE"), index=True)
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), index=True)
    task: Mapped[str] = mapped_column(String(50))
    n_prompts: Mapped[int]
    levels: Mapped[list[Any]]
    circuit_size: Mapped[int]
    sufficiency_mean: Mapped[float]
    sufficiency_std: Mapped[float]
    necessity_mean: Mapped[float]
    necessity_std: Mapped[float]
    evaluations: Mapped[int]
    seconds: Mapped[float]
    result: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    model: Mapped[Model] = relationship()
    transcoder: Mapped[Transcoder] = relationship()


class SweepPoint(Base):
    """One (method, K) row of a sweep; random-curve rows have is_random = True."""

    __tablename__ = "sweep_points"
    __table_args__ = (Index("ix_sweep_points_sweep_id_method_k", "sweep_id", "method", "k"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    sweep_id: Mapped[int] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"))
    method: Mapped[str] = mapped_column(String(50))
    k: Mapped[int]
    is_random: Mapped[bool] = mapped_column(Boolean, default=False)
    kl_mean: Mapped[float]
    kl_std: Mapped[float]
    kl_ci_low: Mapped[float]
    kl_ci_high: Mapped[float]
    pred_change_rate: Mapped[float]
    faithfulness_mean: Mapped[float | None]  # None: no prompt had M_clean != M_none
    n_prompts: Mapped[int]
    seconds: Mapped[float]
    patched_forwards: Mapped[int] = mapped_column(default=0)
    kl_all_mean: Mapped[float | None]
    completeness_mean: Mapped[float | None]

    sweep: Mapped[Sweep] = relationship(back_populates="points")


class Feature(Base):
    """A transcoder feature (layer, index) and its statistics (density, max activation...)."""

    __tablename__ = "features"
    __table_args__ = (UniqueConstraint("transcoder_id", "layer", "index"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    transcoder_id: Mapped[int] = mapped_column(ForeignKey("transcoders.id", ondelete="CASCADE"))
    layer: Mapped[int]
    index: Mapped[int]
    statistics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    transcoder: Mapped[Transcoder] = relationship()


class Example(Base):
    """A top-activating context of a feature: tokens and per-token activations, ranked."""

    __tablename__ = "examples"
    __table_args__ = (Index("ix_examples_feature_id_rank", "feature_id", "rank"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    feature_id: Mapped[int] = mapped_column(ForeignKey("features.id", ondelete="CASCADE"))
    rank: Mapped[int]
    tokens: Mapped[list[Any]]
    activations: Mapped[list[Any]]
    max_activation: Mapped[float]
    quantile: Mapped[int | None]  # 0 = top-activating; 1..Q = activation-quantile bins, high to low
    split: Mapped[str | None] = mapped_column(String(20))  # "explain" (shown to explainers) | "holdout" (raters)
    source: Mapped[str] = mapped_column(String(200), default="")


class Explanation(Base):
    """The current text of an explanation; every earlier version is in explanation_revisions."""

    __tablename__ = "explanations"
    __table_args__ = (CheckConstraint(_in("source", EXPLANATION_SOURCES), name="source"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    feature_id: Mapped[int] = mapped_column(ForeignKey("features.id", ondelete="CASCADE"), index=True)
    text: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(20))
    author: Mapped[str] = mapped_column(String(200), default="")
    model: Mapped[str | None] = mapped_column(String(200))
    revision: Mapped[int] = mapped_column(default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    revisions: Mapped[list[ExplanationRevision]] = relationship(
        back_populates="explanation", cascade="all, delete-orphan", order_by="ExplanationRevision.revision")


class ExplanationRevision(Base):
    """Every version of an explanation, the current one included (revision 1 is the original)."""

    __tablename__ = "explanation_revisions"
    __table_args__ = (UniqueConstraint("explanation_id", "revision"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    explanation_id: Mapped[int] = mapped_column(ForeignKey("explanations.id", ondelete="CASCADE"))
    revision: Mapped[int]
    text: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(20))
    author: Mapped[str] = mapped_column(String(200), default="")
    model: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    explanation: Mapped[Explanation] = relationship(back_populates="revisions")


class ExplanationScore(Base):
    """A FADE (or other) metric of an explanation, as rated by `rater`."""

    __tablename__ = "explanation_scores"
    __table_args__ = (Index("ix_explanation_scores_explanation_id_metric", "explanation_id", "metric"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    explanation_id: Mapped[int] = mapped_column(ForeignKey("explanations.id", ondelete="CASCADE"))
    metric: Mapped[str] = mapped_column(String(50))
    value: Mapped[float]
    rater: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Annotation(Base):
    """A person's judgement of an explanation or a feature: rating 0/1/2, label, comment."""

    __tablename__ = "annotations"
    __table_args__ = (
        CheckConstraint("rating IS NULL OR rating IN (0, 1, 2)", name="rating"),
        CheckConstraint("explanation_id IS NOT NULL OR feature_id IS NOT NULL", name="target"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    explanation_id: Mapped[int | None] = mapped_column(ForeignKey("explanations.id", ondelete="CASCADE"),
                                                       index=True)
    feature_id: Mapped[int | None] = mapped_column(ForeignKey("features.id", ondelete="CASCADE"), index=True)
    rating: Mapped[int | None]
    label: Mapped[str | None] = mapped_column(String(200))
    comment: Mapped[str | None] = mapped_column(Text)
    author: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EdgeCircuit(Base):
    """An edge circuit (backend.edges.pipeline.EdgeCircuit): kept edges, metrics, cost as JSON."""

    __tablename__ = "edge_circuits"
    __table_args__ = (Index("ix_edge_circuits_model_task_method", "model_id", "task", "method"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    params_hash: Mapped[str] = mapped_column(String(64), unique=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), index=True)
    task: Mapped[str] = mapped_column(String(50))
    method: Mapped[str] = mapped_column(String(50))
    n_prompts: Mapped[int]
    n_edges: Mapped[int]
    n_kept: Mapped[int]
    sparsity: Mapped[float]
    kl_mean: Mapped[float]
    kl_ci_low: Mapped[float]
    kl_ci_high: Mapped[float]
    recovered: Mapped[float | None]
    seconds: Mapped[float]
    result: Mapped[dict[str, Any]]
    # The circuit's heads' attention patterns on its first prompts (backend.edges.attention JSON);
    # NULL for circuits stored before they were computed. Loaded only when asked for.
    attention: Mapped[dict[str, Any] | None] = mapped_column(deferred=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    model: Mapped[Model] = relationship()


class EdgeSweep(Base):
    """Edge methods over edge counts (backend.edges.pipeline.EdgeSweep) as JSON."""

    __tablename__ = "edge_sweeps"
    __table_args__ = (Index("ix_edge_sweeps_model_task", "model_id", "task"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    params_hash: Mapped[str] = mapped_column(String(64), unique=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), index=True)
    task: Mapped[str] = mapped_column(String(50))
    methods: Mapped[list[Any]]
    counts: Mapped[list[Any]]
    n_prompts: Mapped[int]
    n_edges: Mapped[int]
    seconds: Mapped[float]
    result: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    model: Mapped[Model] = relationship()
