"""Stored HAGD hierarchies (made by `hagd` jobs)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from sqlalchemy.orm import Session

from backend.api.deps import get_session
from backend.api.schemas import HierarchyDetail, HierarchySummary, Offset, Page, RecordId
from backend.store import queries
from backend.store.tables import Hierarchy

router = APIRouter(prefix="/api", tags=["hierarchies"])


def _fields(row: Hierarchy) -> dict:
    return dict(id=row.id, model=row.model.name, transcoder=row.transcoder.name, task=row.task,
                n_prompts=row.n_prompts, levels=row.levels, circuit_size=row.circuit_size,
                sufficiency_mean=row.sufficiency_mean, sufficiency_std=row.sufficiency_std,
                necessity_mean=row.necessity_mean, necessity_std=row.necessity_std,
                evaluations=row.evaluations, seconds=row.seconds, created_at=row.created_at)


@router.get("/hierarchies", response_model=Page[HierarchySummary])
def list_hierarchies(model: str | None = None, task: str | None = None, limit: int = Query(50, ge=1, le=500),
                     offset: Offset = 0, session: Session = Depends(get_session)) -> Page[HierarchySummary]:
    """HAGD runs filtered by model and task; newest first."""
    rows, total = queries.list_hierarchies(session, model=model, task=task, limit=limit, offset=offset)
    return Page[HierarchySummary](items=[HierarchySummary(**_fields(r)) for r in rows], total=total,
                                  limit=limit, offset=offset)


@router.get("/hierarchies/{hierarchy_id}", response_model=HierarchyDetail)
def get_hierarchy(hierarchy_id: RecordId, session: Session = Depends(get_session)) -> HierarchyDetail:
    """One HAGD run in full."""
    row = queries.get_hierarchy(session, hierarchy_id)
    return HierarchyDetail(**_fields(row), dataset_id=row.dataset_id, result=row.result)
