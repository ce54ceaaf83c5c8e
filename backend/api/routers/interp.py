"""Interpretation of circuits: features, examples, explanations, scores and the interpretation
cost of a circuit in one call (explain and score jobs are started through POST /api/jobs)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from sqlalchemy.orm import Session

from backend.api.deps import get_session
from backend.api.schemas import RecordId, ScoreOut
from backend.errors import NotFoundError
from backend.store.interp import example_json
from backend.store import queries
from backend.store.tables import MAX_DB_INT

router = APIRouter(prefix="/api", tags=["interpretation"])


@router.get("/features/{feature_id}/examples")
def list_examples(feature_id: RecordId, limit: int = Query(100, ge=1, le=1000),
                  session: Session = Depends(get_session)) -> list[dict[str, Any]]:
    """Examples with their `quantile` (0 = top-activating; 1..Q = quantile bins, high to low)."""
    queries.get_feature(session, feature_id)
    return [example_json(e) for e in queries.list_examples(session, feature_id, limit=limit)]


@router.get("/circuits/{circuit_id}/interpretation")
def circuit_interpretation(circuit_id: RecordId, top_n: int | None = Query(None, ge=1, le=MAX_DB_INT),
                           session: Session = Depends(get_session)) -> dict[str, Any]:
    """The circuit's features (most prompts first) with statistics, examples, explanations and
    their scores, and the circuit's cost JSON (explain/score calls and tokens, active features)."""
    row = queries.get_circuit(session, circuit_id)
    keys = [(int(f["layer"]), int(f["feature"])) for f in row.features][:top_n]
    features = []
    for layer, index in keys:
        try:
            feat = queries.find_feature(session, row.transcoder.name, layer, index)
        except NotFoundError:
            continue
        explanations = [{"id": e.id, "text": e.text, "source": e.source, "model": e.model, "author": e.author,
                         "revision": e.revision,
                         "scores": [ScoreOut.model_validate(s).model_dump(mode="json")
                                    for s in queries.list_scores(session, e.id)]}
                        for e in queries.list_explanations(session, feat.id)]
        features.append({"id": feat.id, "layer": layer, "feature": index, "statistics": feat.statistics,
                         "examples": [example_json(e) for e in queries.list_examples(session, feat.id, limit=1000)],
                         "explanations": explanations})
    return {"circuit_id": row.id, "cost": row.cost or {}, "features": features}
