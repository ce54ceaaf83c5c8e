"""Every read and write of the store, as functions over a Session (ORM only, no SQL strings).

Result objects (`backend.circuits.results`) become rows here and only here. Callers own the
transaction (`backend.store.db.transaction`); functions flush when they need an id.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select, update
from sqlalchemy.orm import Session, defer, joinedload, selectinload

from backend.circuits.results import Circuit as CircuitResult
from backend.circuits.results import SweepResult, SweepRow
from backend.errors import InvalidParameterError, NotFoundError
from backend.store.tables import (EXPLANATION_SOURCES, Annotation, Circuit, Dataset, EdgeCircuit, EdgeSweep,
                                  Example, Explanation, ExplanationRevision, ExplanationScore, Feature,
                                  Hierarchy, Job, Model, Sweep,
                                  SweepPoint, Transcoder, utcnow)

INTERRUPTED = "interrupted: the worker stopped before the job finished"
ACTIVE = ("queued", "running")


def _get(session: Session, table: type, row_id: int, what: str, *, for_update: bool = False, options=()):
    """The row or NotFoundError; for_update locks it (PostgreSQL) for a read-modify-write."""
    row = session.get(table, row_id, with_for_update=for_update or None, populate_existing=for_update,
                      options=options)
    if row is None:
        raise NotFoundError(f"no {what} with id {row_id}")
    return row


def _page(session: Session, stmt: Select, limit: int, offset: int) -> tuple[list, int]:
    total = session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery())) or 0
    return list(session.scalars(stmt.limit(limit).offset(offset))), int(total)


# ------------------------------------------------------------------------------ models, transcoders

def get_or_create_model(session: Session, name: str, architecture: str = "") -> Model:
    row = session.scalar(select(Model).where(Model.name == name))
    if row is None:
        row = Model(name=name, architecture=architecture)
        session.add(row)
        session.flush()
    return row


def get_or_create_transcoder(session: Session, name: str, model: Model,
                             summary: dict[str, Any] | None = None) -> Transcoder:
    """The row of transcoder `name`; created from its `transcoder_summary` when new."""
    row = session.scalar(select(Transcoder).where(Transcoder.name == name))
    if row is None:
        s = summary or {}
        row = Transcoder(name=name, model_id=model.id, kind=s.get("kind", "clt"), n_layers=s.get("layers", 0),
                         d_model=s.get("d_model", 0), n_features=s.get("features", 0),
                         activation=s.get("activation", ""))
        session.add(row)
        session.flush()
    return row


def find_transcoder(session: Session, name: str) -> Transcoder:
    row = session.scalar(select(Transcoder).where(Transcoder.name == name))
    if row is None:
        raise NotFoundError(f"no stored transcoder '{name}'")
    return row


# ------------------------------------------------------------------------------ datasets

def get_or_create_dataset(session: Session, key_hash: str, model: Model, task: str,
                          task_options: dict[str, Any], n: int, seed: int, pairs: list[dict]) -> Dataset:
    row = session.scalar(select(Dataset).where(Dataset.params_hash == key_hash))
    if row is None:
        row = Dataset(params_hash=key_hash, model_id=model.id, task=task, task_options=task_options,
                      n=n, seed=seed, pairs=pairs)
        session.add(row)
        session.flush()
    return row


def get_dataset(session: Session, dataset_id: int) -> Dataset:
    return _get(session, Dataset, dataset_id, "dataset")


# ------------------------------------------------------------------------------ jobs

def find_job_by_hash(session: Session, params_hash: str) -> Job | None:
    return session.scalar(select(Job).where(Job.params_hash == params_hash))


def create_job(session: Session, kind: str, params: dict[str, Any], params_hash: str, device: str) -> Job:
    job = Job(kind=kind, params=params, params_hash=params_hash, status="queued", progress=0.0,
              message="queued", device=device)
    session.add(job)
    session.flush()
    return job


def requeue_job(job: Job) -> None:
    """Reset a failed or cancelled job to run again (its row and id are kept)."""
    job.status, job.progress, job.message, job.error = "queued", 0.0, "queued", None
    job.started_at = job.finished_at = None
    job.circuit_id = job.sweep_id = job.hierarchy_id = None
    job.created_at = utcnow()


def get_job(session: Session, job_id: int) -> Job:
    return _get(session, Job, job_id, "job")


def list_jobs(session: Session, *, status: str | None = None, kind: str | None = None,
              limit: int = 50, offset: int = 0) -> tuple[list[Job], int]:
    stmt = select(Job).order_by(Job.id.desc())
    if status:
        stmt = stmt.where(Job.status == status)
    if kind:
        stmt = stmt.where(Job.kind == kind)
    return _page(session, stmt, limit, offset)


def set_job_running(session: Session, job_id: int) -> bool:
    """queued -> running; False when the job is no longer queued (cancelled meanwhile)."""
    result = session.execute(update(Job).where(Job.id == job_id, Job.status == "queued")
                             .values(status="running", started_at=utcnow(), message="starting"))
    return result.rowcount == 1


def set_job_progress(session: Session, job_id: int, fraction: float, message: str) -> None:
    session.execute(update(Job).where(Job.id == job_id, Job.status == "running")
                    .values(progress=min(max(float(fraction), 0.0), 1.0), message=message[:2000]))


def finish_job(session: Session, job_id: int, status: str, *, message: str = "", error: str | None = None,
               circuit_id: int | None = None, sweep_id: int | None = None,
               edge_circuit_id: int | None = None, edge_sweep_id: int | None = None,
               hierarchy_id: int | None = None) -> None:
    values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "message": message[:2000], "error": error}
    if status == "done":
        values["progress"] = 1.0
    if circuit_id is not None:
        values["circuit_id"] = circuit_id
    if sweep_id is not None:
        values["sweep_id"] = sweep_id
    if edge_circuit_id is not None:
        values["edge_circuit_id"] = edge_circuit_id
    if edge_sweep_id is not None:
        values["edge_sweep_id"] = edge_sweep_id
    if hierarchy_id is not None:
        values["hierarchy_id"] = hierarchy_id
    session.execute(update(Job).where(Job.id == job_id).values(**values))


def cancel_queued_job(session: Session, job_id: int) -> bool:
    """queued -> cancelled at once; False if the job was not queued."""
    result = session.execute(update(Job).where(Job.id == job_id, Job.status == "queued")
                             .values(status="cancelled", finished_at=utcnow(), message="cancelled"))
    return result.rowcount == 1


def mark_interrupted(session: Session, reason: str = INTERRUPTED) -> int:
    """Jobs left queued/running by a dead process -> failed with `reason`; returns how many."""
    result = session.execute(update(Job).where(Job.status.in_(ACTIVE))
                             .values(status="failed", error=reason, message=reason, finished_at=utcnow()))
    return int(result.rowcount or 0)


def job_result_exists(session: Session, job: Job) -> bool:
    """A done job whose result row is still stored (else it must run again)."""
    if job.kind == "sweep":
        return job.sweep_id is not None and session.get(Sweep, job.sweep_id) is not None
    if job.kind == "graph":
        circuit = session.get(Circuit, job.circuit_id) if job.circuit_id else None
        key = graph_key(job.params.get("prompt"), job.params.get("target", "metric"))
        return circuit is not None and bool(circuit.graphs) and key in circuit.graphs
    if job.kind == "prune":
        return job.circuit_id is not None and session.get(Circuit, job.circuit_id) is not None
    if job.kind == "score":  # scores are of the explanations (and human ratings) as they were then
        return job.finished_at is not None and not _interpretation_changed_since(session, job)
    if job.kind == "edges":
        return job.edge_circuit_id is not None and session.get(EdgeCircuit, job.edge_circuit_id) is not None
    if job.kind == "edge-sweep":
        return job.edge_sweep_id is not None and session.get(EdgeSweep, job.edge_sweep_id) is not None
    if job.kind == "hagd":
        return job.hierarchy_id is not None and session.get(Hierarchy, job.hierarchy_id) is not None
    return True  # other kinds keep no result row that could have been deleted


def _interpretation_changed_since(session: Session, job: Job) -> bool:
    """Whether an explanation or a rating of the features a score job targets is newer than it."""
    params = job.params
    if params.get("feature_id") is not None:
        feature_ids = [int(params["feature_id"])]
    else:
        circuit = session.get(Circuit, params.get("circuit_id"))
        if circuit is None:
            return True
        keys = {(int(f["layer"]), int(f["feature"])) for f in circuit.features}
        feature_ids = [f.id for f in session.scalars(select(Feature).where(Feature.transcoder_id ==
                                                                          circuit.transcoder_id))
                       if (f.layer, f.index) in keys]
    explanations = select(Explanation.id).where(Explanation.feature_id.in_(feature_ids))
    newer = session.scalar(select(func.count()).select_from(Explanation).where(
        Explanation.feature_id.in_(feature_ids), Explanation.updated_at > job.finished_at))
    rated = session.scalar(select(func.count()).select_from(Annotation).where(
        Annotation.explanation_id.in_(explanations), Annotation.rating.is_not(None),
        Annotation.created_at > job.finished_at))
    return bool(newer or rated)


# ------------------------------------------------------------------------------ circuits

def save_circuit(session: Session, result: CircuitResult, params_hash: str, model: Model,
                 transcoder: Transcoder, dataset: Dataset | None) -> Circuit:
    """Store a pruned circuit (replacing an earlier row with the same params hash)."""
    old = session.scalar(select(Circuit).where(Circuit.params_hash == params_hash))
    if old is not None:
        session.delete(old)
        session.flush()
    data = result.to_json()
    row = Circuit(params_hash=params_hash, model_id=model.id, transcoder_id=transcoder.id,
                  dataset_id=dataset.id if dataset else None, task=result.task, method=result.method,
                  k=result.k, budget=result.budget, corruption=result.corruption, options=data["options"],
                  n_prompts=len(result.prompts), prompts=data["prompts"], features=data["features"],
                  kl_mean=result.kl.mean, kl_std=result.kl.std, kl_ci_low=float(result.kl.ci95[0]),
                  kl_ci_high=float(result.kl.ci95[1]), pred_change_rate=result.pred_change_rate,
                  faithfulness_mean=result.faithfulness_mean, completeness_mean=result.completeness_mean,
                  seconds=result.seconds, cost=data["cost"], graphs=None, graph_keys=[])
    session.add(row)
    register_features(session, transcoder, {(f.layer, f.feature) for f in result.features})
    session.flush()
    return row


def register_features(session: Session, transcoder: Transcoder, keys: set[tuple[int, int]]) -> None:
    """Feature rows for every (layer, index) a circuit kept, so each can be explained and annotated.

    One query finds the existing rows; only the missing ones are inserted.
    """
    if not keys:
        return
    existing = {(layer, index) for layer, index in session.execute(
        select(Feature.layer, Feature.index).where(Feature.transcoder_id == transcoder.id))}
    session.add_all([Feature(model_id=transcoder.model_id, transcoder_id=transcoder.id, layer=layer, index=index,
                             statistics={}) for layer, index in sorted(keys - existing)])


def circuit_result(row: Circuit) -> CircuitResult:
    """The stored row back as a `results.Circuit`."""
    return CircuitResult.from_json({
        "model": row.model.name, "transcoder": row.transcoder.name, "task": row.task, "method": row.method,
        "k": row.k, "budget": row.budget, "corruption": row.corruption, "options": row.options,
        "prompts": row.prompts, "features": row.features,
        "kl": {"mean": row.kl_mean, "std": row.kl_std, "ci95": [row.kl_ci_low, row.kl_ci_high]},
        "pred_change_rate": row.pred_change_rate, "faithfulness_mean": row.faithfulness_mean,
        "completeness_mean": row.completeness_mean, "seconds": row.seconds, "cost": row.cost,
    })


def get_circuit(session: Session, circuit_id: int) -> Circuit:
    """The circuit with its model and transcoder (one joined query: every reader names them)."""
    return _get(session, Circuit, circuit_id, "circuit",
                options=(joinedload(Circuit.model), joinedload(Circuit.transcoder)))


def list_circuits(session: Session, *, model: str | None = None, transcoder: str | None = None,
                  task: str | None = None, method: str | None = None, k: int | None = None,
                  limit: int = 50, offset: int = 0) -> tuple[list[Circuit], int]:
    """Circuits filtered by model/transcoder name, task, method, K; newest first.

    The heavy JSON columns (prompts, features, graphs...) are not loaded: listings show metrics.
    """
    stmt = select(Circuit).options(selectinload(Circuit.model), selectinload(Circuit.transcoder),
                                   defer(Circuit.prompts), defer(Circuit.features), defer(Circuit.graphs),
                                   defer(Circuit.options), defer(Circuit.cost))
    if model:
        stmt = stmt.join(Model, Circuit.model_id == Model.id).where(Model.name == model)
    if transcoder:
        stmt = stmt.join(Transcoder, Circuit.transcoder_id == Transcoder.id).where(Transcoder.name == transcoder)
    if task:
        stmt = stmt.where(Circuit.task == task)
    if method:
        stmt = stmt.where(Circuit.method == method)
    if k is not None:
        stmt = stmt.where(Circuit.k == k)
    return _page(session, stmt.order_by(Circuit.id.desc()), limit, offset)


def graph_key(prompt: int | None, target: str = "metric") -> str:
    """Key of a graph in `circuits.graphs`: "all" or the prompt index, with "@logit" appended for
    graphs of the answer logit (the metric's graphs keep the plain key)."""
    key = "all" if prompt is None else str(prompt)
    return key if target == "metric" else f"{key}@{target}"


def set_circuit_graph(session: Session, circuit_id: int, prompt: int | None, graph: dict[str, Any],
                      target: str = "metric") -> None:
    row = get_circuit(session, circuit_id)
    row.graphs = {**(row.graphs or {}), graph_key(prompt, target): graph}  # a new dict: JSON changes are detected
    row.graph_keys = sorted(row.graphs)


# ------------------------------------------------------------------------------ sweeps

def _point(sweep_id: int, row: SweepRow, is_random: bool) -> SweepPoint:
    return SweepPoint(sweep_id=sweep_id, method=row.method, k=row.k, is_random=is_random, kl_mean=row.kl_mean,
                      kl_std=row.kl_std, kl_ci_low=float(row.kl_ci95[0]), kl_ci_high=float(row.kl_ci95[1]),
                      pred_change_rate=row.pred_change_rate, faithfulness_mean=row.faithfulness_mean,
                      n_prompts=row.n_prompts, seconds=row.seconds, patched_forwards=row.patched_forwards,
                      kl_all_mean=row.kl_all_mean, completeness_mean=row.completeness_mean)


def save_sweep(session: Session, result: SweepResult, params_hash: str, model: Model, transcoder: Transcoder,
               dataset: Dataset | None) -> Sweep:
    """Store a sweep: the full SweepResult JSON plus one point per (method, K) and random row."""
    old = session.scalar(select(Sweep).where(Sweep.params_hash == params_hash))
    if old is not None:
        session.delete(old)
        session.flush()
    row = Sweep(params_hash=params_hash, model_id=model.id, transcoder_id=transcoder.id,
                dataset_id=dataset.id if dataset else None, task=result.task, corruption=result.corruption,
                methods=list(result.methods), ks=list(result.ks), n_prompts=result.n_prompts,
                kl_none_mean=result.kl_none_mean, n_active_mean=result.n_active_mean, seconds=result.seconds,
                result=result.to_json())
    session.add(row)
    session.flush()
    session.add_all([_point(row.id, r, False) for r in result.rows]
                    + [_point(row.id, r, True) for r in result.random_curve])
    session.flush()
    return row


def get_sweep(session: Session, sweep_id: int) -> Sweep:
    return _get(session, Sweep, sweep_id, "sweep")


def list_sweeps(session: Session, *, model: str | None = None, task: str | None = None,
                limit: int = 50, offset: int = 0) -> tuple[list[Sweep], int]:
    stmt = select(Sweep).options(selectinload(Sweep.model), selectinload(Sweep.transcoder), defer(Sweep.result))
    if model:
        stmt = stmt.join(Model, Sweep.model_id == Model.id).where(Model.name == model)
    if task:
        stmt = stmt.where(Sweep.task == task)
    return _page(session, stmt.order_by(Sweep.id.desc()), limit, offset)


# ------------------------------------------------------------------------------ HAGD hierarchies

def save_hierarchy(session: Session, result: dict[str, Any], params_hash: str, model: Model,
                   transcoder: Transcoder, dataset: Dataset | None) -> Hierarchy:
    """Store a HAGD result (HagdResult.to_json), replacing an earlier row with the same hash."""
    old = session.scalar(select(Hierarchy).where(Hierarchy.params_hash == params_hash))
    if old is not None:
        session.delete(old)
        session.flush()
    hagd = result["verification"]["hagd"]
    row = Hierarchy(params_hash=params_hash, model=model, transcoder=transcoder, dataset_id=dataset.id if dataset else None,
                    task=result["task"], n_prompts=result["n_prompts"], levels=list(result["levels"]),
                    circuit_size=len(result["circuit"]), sufficiency_mean=hagd["sufficiency_mean"],
                    sufficiency_std=hagd["sufficiency_std"], necessity_mean=hagd["necessity_mean"],
                    necessity_std=hagd["necessity_std"], evaluations=result["search"]["evaluations"],
                    seconds=result["seconds"]["total"], result=result)
    session.add(row)
    session.flush()
    return row


def get_hierarchy(session: Session, hierarchy_id: int) -> Hierarchy:
    return _get(session, Hierarchy, hierarchy_id, "hierarchy")


def list_hierarchies(session: Session, *, model: str | None = None, task: str | None = None,
                     limit: int = 50, offset: int = 0) -> tuple[list[Hierarchy], int]:
    stmt = select(Hierarchy).options(selectinload(Hierarchy.model), selectinload(Hierarchy.transcoder),
                                     defer(Hierarchy.result))
    if model:
        stmt = stmt.join(Model, Hierarchy.model_id == Model.id).where(Model.name == model)
    if task:
        stmt = stmt.where(Hierarchy.task == task)
    return _page(session, stmt.order_by(Hierarchy.id.desc()), limit, offset)


# ------------------------------------------------------------------------------ features, examples

def get_or_create_feature(session: Session, transcoder: Transcoder, layer: int, index: int,
                          statistics: dict[str, Any] | None = None) -> Feature:
    row = session.scalar(select(Feature).where(Feature.transcoder_id == transcoder.id, Feature.layer == layer,
                                               Feature.index == index))
    if row is None:
        row = Feature(model_id=transcoder.model_id, transcoder_id=transcoder.id, layer=layer, index=index,
                      statistics=statistics or {})
        session.add(row)
        session.flush()
    elif statistics is not None:
        row.statistics = dict(statistics)
    return row


def get_feature(session: Session, feature_id: int) -> Feature:
    return _get(session, Feature, feature_id, "feature")


def find_feature(session: Session, transcoder: str, layer: int, index: int) -> Feature:
    row = session.scalar(select(Feature).join(Transcoder, Feature.transcoder_id == Transcoder.id)
                         .where(Transcoder.name == transcoder, Feature.layer == layer, Feature.index == index))
    if row is None:
        raise NotFoundError(f"no stored feature {layer}/{index} of transcoder '{transcoder}'")
    return row


def list_features(session: Session, *, transcoder: str | None = None, layer: int | None = None,
                  limit: int = 50, offset: int = 0) -> tuple[list[Feature], int]:
    stmt = select(Feature).options(selectinload(Feature.transcoder))
    if transcoder:
        stmt = stmt.join(Transcoder, Feature.transcoder_id == Transcoder.id).where(Transcoder.name == transcoder)
    if layer is not None:
        stmt = stmt.where(Feature.layer == layer)
    return _page(session, stmt.order_by(Feature.layer, Feature.index), limit, offset)


def replace_examples(session: Session, feature: Feature, examples: Sequence[dict[str, Any]]) -> list[Example]:
    """Replace a feature's top-activation examples (dicts: tokens, activations, quantile, split, source)."""
    for old in session.scalars(select(Example).where(Example.feature_id == feature.id)):
        session.delete(old)
    rows = [Example(feature_id=feature.id, rank=rank, tokens=list(e["tokens"]), activations=list(e["activations"]),
                    max_activation=float(max(e["activations"], default=0.0)), quantile=e.get("quantile"),
                    split=e.get("split"), source=e.get("source", ""))
            for rank, e in enumerate(examples)]
    session.add_all(rows)
    session.flush()
    return rows


def list_examples(session: Session, feature_id: int, limit: int = 20) -> list[Example]:
    return list(session.scalars(select(Example).where(Example.feature_id == feature_id)
                                .order_by(Example.rank).limit(limit)))


# ------------------------------------------------------------------------------ explanations

def _check_source(source: str) -> None:
    if source not in EXPLANATION_SOURCES:
        raise InvalidParameterError(f"explanation source must be one of {', '.join(EXPLANATION_SOURCES)}, "
                                    f"not '{source}'")


def create_explanation(session: Session, feature_id: int, text: str, source: str, author: str = "",
                       model: str | None = None) -> Explanation:
    """A new explanation of a feature; its first version is also revision 1 of the history."""
    _check_source(source)
    get_feature(session, feature_id)
    now = utcnow()
    row = Explanation(feature_id=feature_id, text=text, source=source, author=author, model=model, revision=1,
                      created_at=now, updated_at=now)
    row.revisions.append(ExplanationRevision(revision=1, text=text, source=source, author=author, model=model,
                                             created_at=now))
    session.add(row)
    session.flush()
    return row


def update_explanation(session: Session, explanation_id: int, *, text: str | None = None,
                       source: str | None = None, author: str | None = None,
                       model: str | None = None) -> Explanation:
    """Edit an explanation: the new version becomes current and is appended to the history.

    The row is locked first, so concurrent edits each get their own revision number.
    """
    row = _get(session, Explanation, explanation_id, "explanation", for_update=True)
    if source is not None:
        _check_source(source)
    now: datetime = utcnow()
    row.text = row.text if text is None else text
    row.source = row.source if source is None else source
    row.author = row.author if author is None else author
    row.model = row.model if model is None else model
    row.revision += 1
    row.updated_at = now
    row.revisions.append(ExplanationRevision(revision=row.revision, text=row.text, source=row.source,
                                             author=row.author, model=row.model, created_at=now))
    session.flush()
    return row


def get_explanation(session: Session, explanation_id: int) -> Explanation:
    return _get(session, Explanation, explanation_id, "explanation")


def list_explanations(session: Session, feature_id: int) -> list[Explanation]:
    get_feature(session, feature_id)
    return list(session.scalars(select(Explanation).where(Explanation.feature_id == feature_id)
                                .order_by(Explanation.id)))


def list_revisions(session: Session, explanation_id: int) -> list[ExplanationRevision]:
    return list(get_explanation(session, explanation_id).revisions)


def add_score(session: Session, explanation_id: int, metric: str, value: float, rater: str = "") -> ExplanationScore:
    get_explanation(session, explanation_id)
    row = ExplanationScore(explanation_id=explanation_id, metric=metric, value=float(value), rater=rater)
    session.add(row)
    session.flush()
    return row


def list_scores(session: Session, explanation_id: int) -> list[ExplanationScore]:
    return list(session.scalars(select(ExplanationScore).where(ExplanationScore.explanation_id == explanation_id)
                                .order_by(ExplanationScore.id)))


# ------------------------------------------------------------------------------ annotations

def create_annotation(session: Session, *, explanation_id: int | None = None, feature_id: int | None = None,
                      rating: int | None = None, label: str | None = None, comment: str | None = None,
                      author: str = "") -> Annotation:
    """A judgement of an explanation (its feature is filled in) or of a feature."""
    if explanation_id is None and feature_id is None:
        raise InvalidParameterError("an annotation needs an explanation or a feature")
    if rating is not None and rating not in (0, 1, 2):
        raise InvalidParameterError(f"rating must be 0, 1 or 2, not {rating}")
    if explanation_id is not None:
        feature_id = get_explanation(session, explanation_id).feature_id
    else:
        get_feature(session, feature_id)
    row = Annotation(explanation_id=explanation_id, feature_id=feature_id, rating=rating, label=label,
                     comment=comment, author=author)
    session.add(row)
    session.flush()
    return row


def list_annotations(session: Session, *, explanation_id: int | None = None,
                     feature_id: int | None = None) -> list[Annotation]:
    stmt = select(Annotation).order_by(Annotation.id)
    if explanation_id is not None:
        get_explanation(session, explanation_id)
        stmt = stmt.where(Annotation.explanation_id == explanation_id)
    if feature_id is not None:
        stmt = stmt.where(Annotation.feature_id == feature_id)
    return list(session.scalars(stmt))


def update_annotation(session: Session, annotation_id: int, *, rating: int | None = None,
                      label: str | None = None, comment: str | None = None) -> Annotation:
    row = _get(session, Annotation, annotation_id, "annotation", for_update=True)
    if rating is not None:
        if rating not in (0, 1, 2):
            raise InvalidParameterError(f"rating must be 0, 1 or 2, not {rating}")
        row.rating = rating
    row.label = row.label if label is None else label
    row.comment = row.comment if comment is None else comment
    session.flush()
    return row


# ------------------------------------------------------------------------------ edge circuits, edge sweeps

def save_edge_circuit(session: Session, result, params_hash: str, model: Model, dataset: Dataset | None) -> EdgeCircuit:
    """Store an edge circuit (backend.edges.pipeline.EdgeCircuit), replacing one with the same hash."""
    old = session.scalar(select(EdgeCircuit).where(EdgeCircuit.params_hash == params_hash))
    if old is not None:
        session.delete(old)
        session.flush()
    kl = result.metrics["kl"]
    row = EdgeCircuit(params_hash=params_hash, model_id=model.id, dataset_id=dataset.id if dataset else None,
                      task=result.task, method=result.method, n_prompts=result.n_prompts,
                      n_edges=result.graph["edges"], n_kept=result.n_kept, sparsity=result.sparsity,
                      kl_mean=kl["mean"], kl_ci_low=kl["ci95"][0], kl_ci_high=kl["ci95"][1],
                      recovered=_finite_or_none(result.metrics.get("recovered_of_means")),
                      seconds=result.seconds, result=_json_safe(result.to_json()),
                      attention=_json_safe(getattr(result, "attention", None)))
    session.add(row)
    session.flush()
    return row


def save_edge_sweep(session: Session, result, params_hash: str, model: Model, dataset: Dataset | None) -> EdgeSweep:
    old = session.scalar(select(EdgeSweep).where(EdgeSweep.params_hash == params_hash))
    if old is not None:
        session.delete(old)
        session.flush()
    row = EdgeSweep(params_hash=params_hash, model_id=model.id, dataset_id=dataset.id if dataset else None,
                    task=result.task, methods=list(result.methods), counts=list(result.counts),
                    n_prompts=result.n_prompts, n_edges=result.graph["edges"], seconds=result.seconds,
                    result=_json_safe(result.to_json()))
    session.add(row)
    session.flush()
    return row


def get_edge_circuit(session: Session, row_id: int) -> EdgeCircuit:
    return _get(session, EdgeCircuit, row_id, "edge circuit")


def get_edge_sweep(session: Session, row_id: int) -> EdgeSweep:
    return _get(session, EdgeSweep, row_id, "edge sweep")


def list_edge_circuits(session: Session, *, model: str | None = None, task: str | None = None,
                       method: str | None = None, limit: int = 50, offset: int = 0) -> tuple[list[EdgeCircuit], int]:
    stmt = select(EdgeCircuit).options(selectinload(EdgeCircuit.model), defer(EdgeCircuit.result))
    if model:
        stmt = stmt.join(Model, EdgeCircuit.model_id == Model.id).where(Model.name == model)
    if task:
        stmt = stmt.where(EdgeCircuit.task == task)
    if method:
        stmt = stmt.where(EdgeCircuit.method == method)
    return _page(session, stmt.order_by(EdgeCircuit.id.desc()), limit, offset)


def list_edge_sweeps(session: Session, *, model: str | None = None, task: str | None = None,
                     limit: int = 50, offset: int = 0) -> tuple[list[EdgeSweep], int]:
    stmt = select(EdgeSweep).options(selectinload(EdgeSweep.model), defer(EdgeSweep.result))
    if model:
        stmt = stmt.join(Model, EdgeSweep.model_id == Model.id).where(Model.name == model)
    if task:
        stmt = stmt.where(EdgeSweep.task == task)
    return _page(session, stmt.order_by(EdgeSweep.id.desc()), limit, offset)


def _finite_or_none(value):
    import math
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _json_safe(value):
    """NaN / inf -> None so the JSON column is standard JSON on every database."""
    import math
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
