"""Stored results: circuits (with their graphs) and sweeps."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy.orm import Session

from backend.api.cache import read_revisions
from backend.api.deps import get_session
from backend.api.schemas import CircuitDetail, CircuitSummary, Offset, Page, RecordId, SweepDetail, SweepSummary
from backend.store import queries
from backend.store.tables import MAX_DB_INT, Circuit, Sweep

router = APIRouter(prefix="/api", tags=["results"])
MAX_SUBGRAPH_NODES = 2000   # pinned nodes per subgraph export (a prompt graph holds at most a few thousand)


def _circuit_fields(row: Circuit) -> dict:
    return dict(id=row.id, model=row.model.name, transcoder=row.transcoder.name, task=row.task, method=row.method,
                k=row.k, budget=row.budget, corruption=row.corruption, n_prompts=row.n_prompts,
                kl_mean=row.kl_mean, kl_std=row.kl_std, kl_ci95=(row.kl_ci_low, row.kl_ci_high),
                pred_change_rate=row.pred_change_rate, faithfulness_mean=row.faithfulness_mean,
                completeness_mean=row.completeness_mean, seconds=row.seconds,
                graph_keys=list(row.graph_keys), created_at=row.created_at)


def _sweep_fields(row: Sweep) -> dict:
    return dict(id=row.id, model=row.model.name, transcoder=row.transcoder.name, task=row.task,
                corruption=row.corruption, methods=row.methods, ks=row.ks, n_prompts=row.n_prompts,
                kl_none_mean=row.kl_none_mean, n_active_mean=row.n_active_mean, seconds=row.seconds,
                created_at=row.created_at)


@router.get("/circuits", response_model=Page[CircuitSummary])
def list_circuits(model: str | None = Query(None, max_length=100), transcoder: str | None = Query(None, max_length=200),
                  task: str | None = Query(None, max_length=50), method: str | None = Query(None, max_length=50),
                  k: int | None = Query(None, ge=1, le=MAX_DB_INT),
                  limit: int = Query(50, ge=1, le=500), offset: Offset = 0,
                  session: Session = Depends(get_session)) -> Page[CircuitSummary]:
    """Circuits filtered by model, transcoder, task, method and K; newest first."""
    rows, total = queries.list_circuits(session, model=model, transcoder=transcoder, task=task, method=method,
                                        k=k, limit=limit, offset=offset)
    return Page[CircuitSummary](items=[CircuitSummary(**_circuit_fields(r)) for r in rows], total=total,
                                limit=limit, offset=offset)


@router.get("/circuits/{circuit_id}", response_model=CircuitDetail)
async def get_circuit(circuit_id: RecordId, request: Request) -> Response:
    """Kept occurrences per prompt, aggregated features, metrics, and the graphs once computed.

    Served from an in-process cache of the serialised body (`backend.api.cache`): a hit whose
    revision was confirmed in the last second touches no store; an older hit costs one indexed
    primary-key read on the event loop; a miss (tens of kilobytes of JSON to decode, validate
    and serialise) is built in the threadpool, once for all its concurrent requests.
    """
    cache = request.app.state.circuit_cache
    body = cache.fresh(circuit_id)
    if body is None and cache.holds(circuit_id):
        revision = read_revisions(request.app.state.engine, Circuit, [circuit_id]).get(circuit_id)  # Core, no ORM
        body = cache.get(circuit_id, revision) if revision is not None else None
    if body is None:
        body = await cache.build(circuit_id, _circuit_body, request.app.state.sessions, circuit_id)
    return Response(body, media_type="application/json")


def _circuit_body(sessions, circuit_id: int) -> tuple[int, bytes]:
    """(revision, CircuitDetail JSON) of a stored circuit."""
    with sessions() as session:
        row = queries.get_circuit(session, circuit_id)
        body = CircuitDetail(**_circuit_fields(row), dataset_id=row.dataset_id, options=row.options,
                             prompts=row.prompts, features=row.features, cost=row.cost,
                             graphs=row.graphs or {}).model_dump_json().encode()
        return row.revision, body


@router.get("/sweeps", response_model=Page[SweepSummary])
def list_sweeps(model: str | None = Query(None, max_length=100), task: str | None = Query(None, max_length=50),
                limit: int = Query(50, ge=1, le=500), offset: Offset = 0, session: Session = Depends(get_session)) -> Page[SweepSummary]:
    rows, total = queries.list_sweeps(session, model=model, task=task, limit=limit, offset=offset)
    return Page[SweepSummary](items=[SweepSummary(**_sweep_fields(r)) for r in rows], total=total,
                              limit=limit, offset=offset)


@router.get("/sweeps/{sweep_id}", response_model=SweepDetail)
def get_sweep(sweep_id: RecordId, session: Session = Depends(get_session)) -> SweepDetail:
    """The full SweepResult JSON of a stored sweep."""
    row = queries.get_sweep(session, sweep_id)
    return SweepDetail(**_sweep_fields(row), dataset_id=row.dataset_id, result=row.result)


@router.get("/circuits/{circuit_id}/graphs/{key}/neuronpedia")
def export_graph(circuit_id: RecordId, key: str = Path(max_length=40, description="'all' or a prompt index, "
                                                                               "with '@logit' for logit graphs"),
                 prompt: int | None = Query(None, ge=0, le=MAX_DB_INT),
                 session: Session = Depends(get_session)) -> dict:
    """One prompt's attribution graph as circuit-tracer / Neuronpedia graph JSON.

    key: "all" or a prompt index, with "@logit" for graphs of the answer logit (see graph_keys).
    404 with the computed keys when the circuit has no such graph.
    """
    from backend.store.graph_files import export_graph as neuronpedia_json
    return neuronpedia_json(session, circuit_id, key, prompt)


class SubgraphRequest(BaseModel):
    """Node ids to keep (the dashboard's pinned nodes) of one prompt's graph."""

    model_config = ConfigDict(extra="forbid")

    node_ids: list[Annotated[str, StringConstraints(max_length=64)]] = Field(
        min_length=1, max_length=MAX_SUBGRAPH_NODES, description="node ids of the graph (its target is always kept)")
    prompt: int | None = Field(None, ge=0, le=MAX_DB_INT, description="which prompt of the graph (default: its first)")


@router.post("/circuits/{circuit_id}/graphs/{key}/subgraph")
def export_subgraph(body: SubgraphRequest, circuit_id: RecordId,
                    key: str = Path(max_length=40, description="'all' or a prompt index, with '@logit'"),
                    session: Session = Depends(get_session)) -> dict:
    """The subgraph of one prompt's graph induced by `node_ids` (plus the target) as Neuronpedia
    graph JSON, the ids in qParams.pinnedIds: what `POST /api/graphs/import` reads back.
    422 when a node id is not in the graph."""
    from backend.store.graph_files import export_graph as neuronpedia_json
    return neuronpedia_json(session, circuit_id, key, body.prompt, nodes=body.node_ids)
