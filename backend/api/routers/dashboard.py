"""Read-only views the dashboard needs in one call instead of one per feature.

GET /api/dashboard/explanations?transcoder=<model>/<dir>: the newest explanation of every feature
of that transcoder that has one, so a circuit graph's hover text costs one request.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.api.deps import get_session
from backend.store.tables import Explanation, Feature, Transcoder

router = APIRouter(prefix="/api/dashboard", tags=["dashboard"])


@router.get("/explanations")
def newest_explanations(transcoder: str = Query(max_length=200), session: Session = Depends(get_session)) -> list[dict[str, Any]]:
    """Rows {layer, index, feature_id, explanation_id, text, source}: each feature's newest edit."""
    stmt = (select(Feature.layer, Feature.index, Feature.id, Explanation.id, Explanation.text, Explanation.source,
                   Explanation.updated_at)
            .join(Explanation, Explanation.feature_id == Feature.id)
            .join(Transcoder, Feature.transcoder_id == Transcoder.id)
            .where(Transcoder.name == transcoder)
            .order_by(Explanation.updated_at, Explanation.id))
    newest: dict[tuple[int, int], dict[str, Any]] = {}
    for layer, index, feature_id, explanation_id, text, source, _ in session.execute(stmt):
        newest[(layer, index)] = {"layer": layer, "index": index, "feature_id": feature_id,
                                  "explanation_id": explanation_id, "text": text, "source": source}
    return list(newest.values())
