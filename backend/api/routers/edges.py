"""Stored edge circuits and edge sweeps (list, get), and the edge methods' registry."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from sqlalchemy.orm import Session

from backend.api.deps import get_session
from backend.api.schemas import (EdgeAttentionOut, EdgeCircuitDetail, EdgeCircuitSummary, EdgeSweepDetail,
                                 EdgeSweepSummary, Offset, Page, RecordId)
from backend.errors import NotFoundError
from backend.store import queries
from backend.store.tables import EdgeCircuit, EdgeSweep

router = APIRouter(prefix="/api", tags=["edges"])


def _circuit_fields(row: EdgeCircuit) -> dict:
    return dict(id=row.id, model=row.model.name, task=row.task, method=row.method, n_prompts=row.n_prompts,
                n_edges=row.n_edges, n_kept=row.n_kept, sparsity=row.sparsity, kl_mean=row.kl_mean,
                kl_ci95=(row.kl_ci_low, row.kl_ci_high), recovered=row.recovered, seconds=row.seconds,
                created_at=row.created_at)


def _sweep_fields(row: EdgeSweep) -> dict:
    return dict(id=row.id, model=row.model.name, task=row.task, methods=row.methods, counts=row.counts,
                n_prompts=row.n_prompts, n_edges=row.n_edges, seconds=row.seconds, created_at=row.created_at)


@router.get("/edge-methods")
def edge_methods() -> list[dict]:
    """The one registry of edge methods: name, description, options with defaults."""
    from backend.edges.registry import list_edge_methods
    return list_edge_methods()


@router.get("/edge-circuits", response_model=Page[EdgeCircuitSummary])
def list_edge_circuits(model: str | None = None, task: str | None = None, method: str | None = None,
                       limit: int = Query(50, ge=1, le=500), offset: Offset = 0,
                       session: Session = Depends(get_session)) -> Page[EdgeCircuitSummary]:
    """Edge circuits filtered by model, task and method; newest first."""
    rows, total = queries.list_edge_circuits(session, model=model, task=task, method=method, limit=limit,
                                             offset=offset)
    return Page[EdgeCircuitSummary](items=[EdgeCircuitSummary(**_circuit_fields(r)) for r in rows], total=total,
                                    limit=limit, offset=offset)


@router.get("/edge-circuits/{circuit_id}", response_model=EdgeCircuitDetail)
def get_edge_circuit(circuit_id: RecordId, session: Session = Depends(get_session)) -> EdgeCircuitDetail:
    """One edge circuit: kept edges with scores, counts, metrics with CIs, cost."""
    row = queries.get_edge_circuit(session, circuit_id)
    return EdgeCircuitDetail(**_circuit_fields(row), result=row.result)


@router.get("/edge-circuits/{circuit_id}/attention", response_model=EdgeAttentionOut)
def get_edge_circuit_attention(circuit_id: RecordId,
                               head: str | None = Query(None, max_length=20, pattern=r"^a[0-9]{1,4}\.h[0-9]{1,4}$",
                                                        description='one head, e.g. "a1.h0"; all when unset'),
                               patterns: bool = Query(True, description="false: only each head's summary"),
                               session: Session = Depends(get_session)) -> EdgeAttentionOut:
    """The circuit's heads' attention patterns on its first prompts, with where the last position
    attends most. 404 for an unknown circuit, a circuit stored without patterns, or a head not in it."""
    row = queries.get_edge_circuit(session, circuit_id)
    data = row.attention
    if data is None:
        raise NotFoundError(f"edge circuit {circuit_id} was stored without attention patterns "
                            "(computed before they were kept); run its edges job again to get them")
    heads = data["heads"] if head is None else [h for h in data["heads"] if h["head"] == head]
    if head is not None and not heads:
        raise NotFoundError(f"head {head} is not in edge circuit {circuit_id}; its heads: "
                            + (", ".join(h["head"] for h in data["heads"][:20]) or "none"))
    return EdgeAttentionOut(circuit_id=circuit_id, n_prompts=data["n_prompts"], decimals=data["decimals"],
                            prompts=data["prompts"],
                            heads=[{**h, "patterns": h["patterns"] if patterns else None} for h in heads])


@router.get("/edge-sweeps", response_model=Page[EdgeSweepSummary])
def list_edge_sweeps(model: str | None = None, task: str | None = None,
                     limit: int = Query(50, ge=1, le=500), offset: Offset = 0,
                     session: Session = Depends(get_session)) -> Page[EdgeSweepSummary]:
    rows, total = queries.list_edge_sweeps(session, model=model, task=task, limit=limit, offset=offset)
    return Page[EdgeSweepSummary](items=[EdgeSweepSummary(**_sweep_fields(r)) for r in rows], total=total,
                                  limit=limit, offset=offset)


@router.get("/edge-sweeps/{sweep_id}", response_model=EdgeSweepDetail)
def get_edge_sweep(sweep_id: RecordId, session: Session = Depends(get_session)) -> EdgeSweepDetail:
    row = queries.get_edge_sweep(session, sweep_id)
    return EdgeSweepDetail(**_sweep_fields(row), result=row.result)
