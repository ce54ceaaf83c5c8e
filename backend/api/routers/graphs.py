"""Attribution-graph files: import a circuit-tracer / Neuronpedia graph JSON (the request body).

The route never reads a path from the request: the graph itself is the body (up to
MAX_GRAPH_BODY_BYTES). A malformed graph is a 422 with the reason; invalid JSON a 400.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy.orm import Session

from backend.api.deps import get_session
from backend.errors import InvalidParameterError, UserError
from backend.jobs import NAME_PATTERN, TRANSCODER_PATTERN

MAX_GRAPH_BODY_BYTES = 32 << 20

router = APIRouter(prefix="/api", tags=["graphs"])


BODY_SCHEMA = {"type": "object", "required": ["metadata", "nodes", "links"],
               "description": "circuit-tracer / Neuronpedia graph JSON (create_graph_files' schema)",
               "properties": {"metadata": {"type": "object", "required": ["prompt_tokens"]},
                              "qParams": {"type": "object"}, "nodes": {"type": "array"}, "links": {"type": "array"}}}


@router.post("/graphs/import", status_code=201,
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": BODY_SCHEMA}}}})
async def import_graph(request: Request,
                       model: str | None = Query(None, pattern=NAME_PATTERN,
                                                 description="model name; default: read off metadata.scan"),
                       transcoder: str | None = Query(None, pattern=TRANSCODER_PATTERN,
                                                      description="<model>/<dir>; default: from metadata.scan"),
                       session: Session = Depends(get_session)) -> dict[str, Any]:
    """Store a graph JSON (`metadata`, `qParams`, `nodes`, `links`) as an imported circuit.

    Returns {"circuit_id", "graph_key", "nodes", "links"}; the circuit page draws it.
    """
    from backend.store.graph_files import import_graph as store_graph
    body = await request.body()
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"the body is not JSON: {err}") from None
    if not isinstance(doc, dict):
        raise InvalidParameterError("a graph JSON is an object with metadata, qParams, nodes and links")
    circuit_id, key = store_graph(session, doc, model=model, transcoder=transcoder)
    session.commit()
    return {"circuit_id": circuit_id, "graph_key": key, "nodes": len(doc.get("nodes", [])),
            "links": len(doc.get("links", []))}
