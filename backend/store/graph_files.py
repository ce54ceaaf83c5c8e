"""Attribution-graph files (circuit-tracer / Neuronpedia graph JSON) imported into the store.

An imported graph becomes a circuit row of method "imported" with one prompt: its feature
nodes are the kept occurrences, its graph is stored under the prompt's key (with "@logit" when
its target is a logit), and its metrics are None (nothing was measured), so the dashboard's
circuit page draws it and its features can be explained like any other circuit's.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.circuits.graph import Graph
from backend.circuits.graph_attribution import aggregate_graphs
from backend.errors import InvalidParameterError
from backend.jobs import NAME_PATTERN, TRANSCODER_PATTERN

IMPORTED = "imported"


def _names(graph_doc: dict[str, Any], model: str | None, transcoder: str | None) -> tuple[str, str]:
    """(model, transcoder) names: given, else read off the file's `metadata.scan`."""
    scan = str((graph_doc.get("metadata") or {}).get("scan") or "")
    if transcoder is None and re.fullmatch(TRANSCODER_PATTERN, scan):
        transcoder = scan                     # a PIEscope export: scan is "<model>/<dir>"
    if model is None:
        if transcoder is not None:
            model = transcoder.split("/", 1)[0]
        elif re.fullmatch(NAME_PATTERN, scan):
            model = scan
        else:
            raise InvalidParameterError("the graph file names no usable model (metadata.scan); give the model name")
    if transcoder is None:
        transcoder = f"{model}/{scan if re.fullmatch(NAME_PATTERN, scan) else IMPORTED}"
    for value, pattern, what in ((model, NAME_PATTERN, "model"), (transcoder, TRANSCODER_PATTERN, "transcoder")):
        if not re.fullmatch(pattern, value):
            raise InvalidParameterError(f"{what} name {value!r} is not a name ({pattern})")
    if transcoder.split("/", 1)[0] != model:
        raise InvalidParameterError(f"transcoder '{transcoder}' belongs to model '{transcoder.split('/', 1)[0]}', "
                                    f"not '{model}'")
    return model, transcoder


def imported_graph_key(graph: Graph) -> str:
    from backend.store.queries import graph_key
    target = graph.target
    return graph_key(graph.prompt, "logit" if target is not None and target.kind == "logit" else "metric")


def import_graph(session: Session, graph_doc: dict[str, Any], *, model: str | None = None,
                 transcoder: str | None = None) -> tuple[int, str]:
    """Store a Neuronpedia / circuit-tracer graph JSON as an imported circuit -> (circuit id, graph key).

    Malformed files raise InvalidParameterError. The same graph imports to the same row.
    """
    from backend.models.registry import MODELS
    from backend.store import queries
    from backend.store.tables import Circuit as CircuitRow
    graph = Graph.from_neuronpedia(graph_doc)
    model, transcoder = _names(graph_doc, model, transcoder)
    stored = graph.to_json()
    digest = hashlib.sha256(json.dumps({"graph": stored, "model": model, "transcoder": transcoder},
                                       sort_keys=True).encode()).hexdigest()
    key = imported_graph_key(graph)
    existing = session.scalar(select(CircuitRow.id).where(CircuitRow.params_hash == digest))
    if existing is not None:
        return int(existing), key
    spec = MODELS.get(model)
    model_row = queries.get_or_create_model(session, model, spec.architecture if spec else "")
    tc_row = queries.get_or_create_transcoder(session, transcoder, model_row)
    features = [n for n in graph.nodes if n.kind == "feature"]
    kept = [{"layer": n.layer, "feature": n.feature, "position": n.position, "score": n.score,
             "activation": n.activation, "delta": None} for n in features]
    by_feature: dict[tuple[int, int], float] = {}
    for n in features:
        by_feature[(n.layer, n.feature)] = max(by_feature.get((n.layer, n.feature), 0.0), abs(n.score or 0.0))
    metadata = graph_doc.get("metadata") or {}
    prompt = {"index": graph.prompt, "clean": str(metadata.get("prompt") or "".join(graph.tokens)), "corrupted": "",
              "tokens": list(graph.tokens), "n_active": len(features), "kept": kept, "kl_last": None,
              "kl_all": None, "pred_changed": None, "faithfulness": None, "completeness": None}
    row = CircuitRow(
        params_hash=digest, model_id=model_row.id, transcoder_id=tc_row.id, dataset_id=None, task=IMPORTED,
        method=IMPORTED, k=len(features), budget=IMPORTED, corruption="none",
        options={"source": "graph file", "slug": str(metadata.get("slug") or ""), "scan": str(metadata.get("scan") or "")},
        n_prompts=1, prompts=[prompt],
        features=[{"layer": l, "feature": f, "n_prompts": 1, "mean_abs_score": s}
                  for (l, f), s in sorted(by_feature.items(), key=lambda kv: -kv[1])],
        kl_mean=None, kl_std=None, kl_ci_low=None, kl_ci_high=None, pred_change_rate=None,
        faithfulness_mean=None, completeness_mean=None, seconds=0.0, cost={},
        graphs={key: {"model": model, "transcoder": transcoder, "method": IMPORTED, "k": len(features),
                      "target": graph.target.kind if graph.target else None, "graphs": [stored],
                      "aggregate": aggregate_graphs([graph])}},
        graph_keys=[key])
    session.add(row)
    queries.register_features(session, tc_row, set(by_feature))
    session.flush()
    return row.id, key


def export_graph(session: Session, circuit_id: int, key: str, prompt: int | None = None,
                 nodes: list[str] | None = None) -> dict[str, Any]:
    """One prompt's stored graph of a circuit as Neuronpedia graph JSON.

    key: "all" or a prompt index, with "@logit" for graphs of the answer logit; prompt: which
    prompt of that graph (default: its first). NotFoundError (404) says what is computed.
    nodes: export only the subgraph induced by these node ids (and the target), pinned in
    qParams.pinnedIds; an id the graph lacks is an InvalidParameterError (422).
    """
    from backend.errors import NotFoundError
    from backend.store import queries
    row = queries.get_circuit(session, circuit_id)
    stored = (row.graphs or {}).get(key)
    computed = ", ".join(row.graph_keys or []) or "none (run a graph job first)"
    if not isinstance(stored, dict) or not stored.get("graphs"):
        raise NotFoundError(f"circuit {circuit_id} has no graph '{key}'; computed: {computed}")
    graphs = {int(g["prompt"]): g for g in stored["graphs"]}
    index = prompt if prompt is not None else min(graphs)
    if index not in graphs:
        raise NotFoundError(f"graph '{key}' of circuit {circuit_id} has no prompt {index}; it has {sorted(graphs)}")
    text = next((p["clean"] for p in row.prompts if p["index"] == index), "")
    try:
        graph = Graph.from_json(graphs[index])
    except (KeyError, TypeError, ValueError) as err:  # a stored document that is not a whole graph
        raise NotFoundError(f"graph '{key}' of circuit {circuit_id} has no complete graph of prompt {index} "
                            f"to export (missing {err})") from None
    slug = f"piescope-circuit-{circuit_id}-prompt-{index}"
    if nodes is not None:
        graph = graph.subgraph(nodes)
        return graph.to_neuronpedia(slug=f"{slug}-subgraph", scan=row.transcoder.name, prompt=text,
                                    pinned=list(dict.fromkeys(nodes)))
    return graph.to_neuronpedia(slug=slug, scan=row.transcoder.name, prompt=text)
