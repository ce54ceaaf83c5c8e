"""Stored edge circuits and edge sweeps (list, get), and the edge methods' registry."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from sqlalchemy.orm import Session

from backend.api.deps import get_session
from backend.api.schemas import (EdgeCircuitDetail, EdgeCircuitSummary, EdgeSweepDetail, EdgeSweepSummary, Offset, Page,
                                 RecordId)
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
