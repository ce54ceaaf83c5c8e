"""Pydantic schemas of the HTTP API (separate from the ORM tables in backend.store.tables).

Job parameter schemas are those of `backend.jobs` (shared with the CLI), so the API and the CLI
validate, normalise and hash requests the same way. Text fields are stored as given: the
dashboard escapes them when it renders. Every error answer (4xx) is an `ErrorOut`; every
timestamp carries its zone (UTC).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Generic, Literal, TypeVar, Union

from fastapi import Path, Query
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, computed_field, create_model

from backend.api.jobs import PIE_KINDS
from backend.store.tables import MAX_DB_INT

T = TypeVar("T")
MAX_TEXT = 20_000
MAX_SHORT = 200

# Path and query integers the store can hold (PostgreSQL integers are 32-bit): beyond -> 422.
RecordId = Annotated[int, Path(ge=1, le=MAX_DB_INT, description="record id", examples=[1])]
Offset = Annotated[int, Query(ge=0, le=MAX_DB_INT, description="rows to skip")]


class FieldError(BaseModel):
    """One invalid part of a request: where (`loc`, e.g. ["body", "params", "k"]), what, which rule."""

    loc: list[str | int]
    msg: str
    type: str


class ErrorOut(BaseModel):
    """Every 4xx answer: one line saying what is wrong; for invalid requests, the fields too."""

    detail: str
    errors: list[FieldError] = Field(default_factory=list)


class Page(BaseModel, Generic[T]):
    """One page of a listing: items plus the total count under the same filters."""

    items: list[T]
    total: int
    limit: int
    offset: int


# ------------------------------------------------------------------------------ jobs

def job_request(kind: str, params: type[BaseModel]) -> type[BaseModel]:
    """The request body of one job kind: {"kind": kind, "params": <its params model>}."""
    name = "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]+", kind)) + "JobCreate"
    return create_model(name, __config__=ConfigDict(extra="forbid"), kind=(Literal[kind], ...),
                        params=(params, ...))


# A discriminated union over the executor's registry (backend.api.jobs.PIE_KINDS): a new kind
# plugs in there, and a bad request gets the errors of its own kind only.
JobCreate = Annotated[Union[tuple(job_request(kind, spec.params) for kind, spec in PIE_KINDS.items())],  # noqa: UP007
                      Field(discriminator="kind")]


class JobOut(BaseModel):
    """A job's state; `links` point at its result once done (circuit, sweep)."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: str
    params: dict[str, Any]
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    progress: float
    message: str
    error: str | None
    device: str
    created_at: AwareDatetime
    started_at: AwareDatetime | None
    finished_at: AwareDatetime | None
    circuit_id: int | None
    sweep_id: int | None
    edge_circuit_id: int | None = None
    edge_sweep_id: int | None = None
    hierarchy_id: int | None = None
    reused: bool = Field(False, description="served from the store or an identical job already queued/running")
    links: dict[str, str] = Field(default_factory=dict)


# ------------------------------------------------------------------------------ circuits, sweeps

class CircuitSummary(BaseModel):
    id: int
    model: str
    transcoder: str
    task: str
    method: str
    k: int
    budget: str
    corruption: str
    n_prompts: int
    kl_mean: float | None = Field(description="None for a circuit imported from a graph file (not measured)")
    kl_std: float | None
    kl_ci95: list[float | None] = Field(min_length=2, max_length=2, description="(low, high)")
    pred_change_rate: float | None
    faithfulness_mean: float | None
    completeness_mean: float | None
    seconds: float
    graph_keys: list[str] = Field(description="computed attribution graphs: 'all' and/or prompt indices")
    created_at: AwareDatetime


class CircuitDetail(CircuitSummary):
    """A circuit with its per-prompt kept occurrences, aggregated features and graphs."""

    dataset_id: int | None
    options: dict[str, Any]
    prompts: list[dict[str, Any]]
    features: list[dict[str, Any]]
    cost: dict[str, Any]
    graphs: dict[str, Any] = Field(default_factory=dict,
                                   description="'all' | prompt index -> circuit-tracer graph JSON")


class SweepSummary(BaseModel):
    id: int
    model: str
    transcoder: str
    task: str
    corruption: str
    methods: list[str]
    ks: list[int]
    n_prompts: int
    kl_none_mean: float
    n_active_mean: float
    seconds: float
    created_at: AwareDatetime


class SweepDetail(SweepSummary):
    """A sweep with the full SweepResult JSON (`backend.circuits.results.SweepResult.to_json`)."""

    dataset_id: int | None
    result: dict[str, Any]


# ------------------------------------------------------------------------------ features, interpretation

class ExampleOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    rank: int
    tokens: list[Any]
    activations: list[float]
    max_activation: float
    quantile: int | None = None
    split: str | None = Field(None, description="explain: shown to the explainer; holdout: only raters see it")
    source: str


class ScoreOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    explanation_id: int
    metric: str
    value: float
    rater: str
    created_at: AwareDatetime

    @computed_field(description="true for the offline lexical rater: a proxy, never to be compared "
                                "with human or LLM ratings")
    @property
    def proxy(self) -> bool:
        from backend.interp.raters import is_proxy
        return is_proxy(self.rater)


class ScoreCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: str = Field(min_length=1, max_length=50)
    value: float = Field(allow_inf_nan=False, description="a finite number")
    rater: str = Field("", max_length=MAX_SHORT)


class ExplanationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True, protected_namespaces=())
    id: int
    feature_id: int
    text: str
    source: Literal["llm", "offline", "human"]
    author: str
    model: str | None
    revision: int
    created_at: AwareDatetime
    updated_at: AwareDatetime


class RevisionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True, protected_namespaces=())
    revision: int
    text: str
    source: str
    author: str
    model: str | None
    created_at: AwareDatetime


class ExplanationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    text: str = Field(min_length=1, max_length=MAX_TEXT)
    source: Literal["llm", "offline", "human"] = "human"
    author: str = Field("", max_length=MAX_SHORT)
    model: str | None = Field(None, max_length=MAX_SHORT, description="the LLM that wrote it, if any")


class ExplanationUpdate(BaseModel):
    """An edit: given fields replace the current ones; the old version stays in the history."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    text: str | None = Field(None, min_length=1, max_length=MAX_TEXT)
    source: Literal["llm", "offline", "human"] | None = None
    author: str | None = Field(None, max_length=MAX_SHORT)
    model: str | None = Field(None, max_length=MAX_SHORT)


class AnnotationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    explanation_id: int | None
    feature_id: int | None
    rating: int | None
    label: str | None
    comment: str | None
    author: str
    created_at: AwareDatetime


class AnnotationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rating: Literal[0, 1, 2] | None = None
    label: str | None = Field(None, max_length=MAX_SHORT)
    comment: str | None = Field(None, max_length=MAX_TEXT)
    author: str = Field("", max_length=MAX_SHORT)


class AnnotationUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rating: Literal[0, 1, 2] | None = None
    label: str | None = Field(None, max_length=MAX_SHORT)
    comment: str | None = Field(None, max_length=MAX_TEXT)


class FeatureOut(BaseModel):
    id: int
    model: str
    transcoder: str
    layer: int
    index: int
    statistics: dict[str, Any]


class FeatureDetail(FeatureOut):
    """A feature with its top examples and explanations."""

    examples: list[ExampleOut]
    explanations: list[ExplanationOut]


# ------------------------------------------------------------------------------ edge circuits, edge sweeps

class EdgeCircuitSummary(BaseModel):
    id: int
    model: str
    task: str
    method: str
    n_prompts: int
    n_edges: int
    n_kept: int
    sparsity: float
    kl_mean: float
    kl_ci95: list[float] = Field(min_length=2, max_length=2, description="(low, high)")
    recovered: float | None
    seconds: float
    created_at: AwareDatetime


class EdgeCircuitDetail(EdgeCircuitSummary):
    result: dict[str, Any] = Field(description="backend.edges.pipeline.EdgeCircuit JSON: kept edges, metrics, cost")


class AttentionTop(BaseModel):
    """Where the last (answer-predicting) position attends most on one prompt."""

    prompt: int
    query: int
    key: int
    token: str
    weight: float


class AttentionPrompt(BaseModel):
    index: int
    offset: int = Field(description="position of the first token kept (long prompts keep their last tokens)")
    tokens: list[str]


class HeadAttentionOut(BaseModel):
    head: str = Field(description='writer id, e.g. "a1.h0"')
    layer: int
    index: int
    top: list[AttentionTop]
    patterns: list[list[list[float]]] | None = Field(
        None, description="per prompt, [query][key] softmax probabilities (None when patterns=false)")


class EdgeAttentionOut(BaseModel):
    """The attention patterns of an edge circuit's heads on its first prompts (clean run)."""

    circuit_id: int
    n_prompts: int
    decimals: int
    prompts: list[AttentionPrompt]
    heads: list[HeadAttentionOut]


class EdgeSweepSummary(BaseModel):
    id: int
    model: str
    task: str
    methods: list[str]
    counts: list[int]
    n_prompts: int
    n_edges: int
    seconds: float
    created_at: AwareDatetime


class EdgeSweepDetail(EdgeSweepSummary):
    result: dict[str, Any] = Field(description="backend.edges.pipeline.EdgeSweep JSON: rows, curve areas")


# ------------------------------------------------------------------------------ task overview

class OverviewPoint(BaseModel):
    """One stored result on a method's curve: units kept (x), KL and behaviour recovered, cost."""

    x: float = Field(description="units kept: K occurrences per prompt (PIE), circuit features (HAGD), edges")
    kl: float | None = Field(None, description="KL(full || circuit) at the last position; None for HAGD")
    kl_ci95: list[float | None] | None = None
    recovered: float | None = Field(None, description="share of the task metric kept (see the curve's metric)")
    recovered_band: list[float | None] | None = Field(None, description="the curve's `band` around recovered")
    seconds: float | None = None


class OverviewCurve(BaseModel):
    family: Literal["features", "edges"]
    method: str
    source: str = Field(description='where the points come from, e.g. "sweep #3" or "circuits #4, #7"')
    x_unit: str
    metric: str = Field(description="what `recovered` measures for this method")
    band: str = Field(description="what recovered_band is")
    seconds: float = Field(description="total compute of the points shown")
    points: list[OverviewPoint]


class TaskOverview(BaseModel):
    """Every stored method's curve for one model and task (PIE sweeps and circuits, HAGD, edges)."""

    model: str
    task: str
    curves: list[OverviewCurve]


# ------------------------------------------------------------------------------ HAGD hierarchies

class HierarchySummary(BaseModel):
    """A stored HAGD run: levels (clusters per level, finest first), circuit size, verification."""

    id: int
    model: str
    transcoder: str
    task: str
    n_prompts: int
    levels: list[int]
    circuit_size: int
    sufficiency_mean: float
    sufficiency_std: float
    necessity_mean: float
    necessity_std: float
    evaluations: int
    seconds: float
    created_at: AwareDatetime


class HierarchyDetail(HierarchySummary):
    """The whole HagdResult: graph, hierarchy tree, search trace, circuit, verification."""

    dataset_id: int | None
    result: dict[str, Any]
