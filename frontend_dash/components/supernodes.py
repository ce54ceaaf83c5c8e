"""HAGD supernodes on a feature graph, pure functions of a stored hierarchy's JSON (DESIGN 8.3).

A hierarchy (`/api/hierarchies/{id}`, `result`) holds the HAGD graph's nodes (features by
(layer, feature), input tokens) and the tree: `hierarchy.levels[l]` lists the clusters of
level l ("L{l}C{i}", members = HAGD graph node indices). Graph nodes and cluster members are
matched by (layer, feature index). Grouping a drawn graph by level l replaces the feature nodes
of each cluster by one supernode (at the |score|-weighted centre of its members' places, size
by summed |attribution|), unless the cluster is expanded; links are summed between groups and
links inside a group dropped. Tokens and the target are never grouped.

Cluster effects come from what the hierarchy stores: the search trace scores the clusters it
visits with the run's cluster score (`config.score`: "ablation" is the measured share of M lost
removing the cluster, "scorer" the learned GNN's prediction of it); the attribution-mass
baseline (members' FAP over all FAP) is computed for every cluster from the stored graph.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import plotly.graph_objects as go

SUPERNODE = "supernode"
SUPER_COLOR = "#9467bd"


@dataclass
class Grouping:
    """Graph features -> clusters of one level, with what a supernode shows.

    clusters: (layer, feature) -> cluster id; members: cluster id -> its features (layer, feature);
    effects: cluster id -> {"predicted", "measured", "mass", "size"}; expanded: cluster ids drawn
    as their members.
    """

    level: int
    clusters: dict[tuple[int, int], str]
    members: dict[str, list[tuple[int, int]]]
    effects: dict[str, dict[str, Any]]
    fap: dict[tuple[int, int], float]
    expanded: set[str] = field(default_factory=set)


def level_options(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Dropdown options of the levels above the single nodes (level 0), coarsest first."""
    counts = result["hierarchy"]["counts"]
    return [{"label": f"level {l}: {counts[l]} clusters", "value": l} for l in range(len(counts) - 1, 0, -1)]


def _features(result: dict[str, Any]) -> list[tuple[int, int] | None]:
    """Per HAGD graph node: its (layer, feature), None for tokens."""
    return [(int(n["layer"]), int(n["feature"])) if n["kind"] == "feature" else None
            for n in result["graph"]["nodes"]]


def cluster_effects(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Cluster id -> {"predicted", "measured", "mass", "size"} for every cluster of level >= 1.

    predicted / measured: the search trace's score when the run's cluster score was the learned
    scorer / exact ablation and the search visited the cluster, else None; mass: the members'
    summed FAP over the graph's summed FAP; size: feature members.
    """
    nodes = result["graph"]["nodes"]
    total = sum(float(n.get("fap", 0.0)) for n in nodes) or 1.0
    levels = result["hierarchy"]["levels"]
    out: dict[str, dict[str, Any]] = {}
    for level in levels[1:]:
        for c in level:
            out[c["id"]] = {"predicted": None, "measured": None,
                            "mass": sum(float(nodes[m].get("fap", 0.0)) for m in c["members"]) / total,
                            "size": sum(1 for m in c["members"] if nodes[m]["kind"] == "feature")}
    kind = {"scorer": "predicted", "ablation": "measured"}.get((result.get("config") or {}).get("score"))
    if kind is None:
        return out
    top = len(levels) - 1
    for step in (result.get("search") or {}).get("trace", []):
        ids = step.get("clusters")
        if ids is None and step["level"] == top:   # older traces: the top level is scored in index order
            ids = [c["id"] for c in levels[top]]
        for cid, score in zip(ids or [], step["scores"]):
            out[cid][kind] = float(score)
    return out


def grouping(result: dict[str, Any], level: int, expanded: list[str] | set[str] | None = None) -> Grouping:
    """The grouping of graph features by the clusters of `level` (1 .. top)."""
    levels = result["hierarchy"]["levels"]
    if not 1 <= level < len(levels):
        raise ValueError(f"level {level} is not a level of this hierarchy (1..{len(levels) - 1})")
    feats = _features(result)
    clusters: dict[tuple[int, int], str] = {}
    members: dict[str, list[tuple[int, int]]] = {}
    for c in levels[level]:
        keys = [feats[m] for m in c["members"] if feats[m] is not None]
        members[c["id"]] = keys
        for key in keys:
            clusters[key] = c["id"]
    fap = {key: float(n.get("fap", 0.0)) for key, n in zip(feats, result["graph"]["nodes"]) if key is not None}
    return Grouping(level, clusters, members, cluster_effects(result), fap, set(expanded or ()))


def group_nodes(placed: list[dict[str, Any]], links: list[dict[str, Any]], group: Grouping,
                explanations: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(nodes, links) with each collapsed cluster's feature nodes replaced by one supernode.

    placed: drawn nodes with `x`, `y` (graph_figure's layout); a feature in no cluster of the
    level stays as it is. A supernode: node_id "S:<cluster id>", kind "supernode", `members`
    (the node ids it stands for), `score` (their summed attribution, None when the graph has no
    scores), `task_fap` (the hierarchy's summed FAP of the cluster's features in view), `top`
    (up to 5 members (layer, feature, score) by |score|) and the cluster's effects.
    """
    explanations = explanations or {}
    where: dict[str, str] = {}
    bins: dict[str, list[dict[str, Any]]] = defaultdict(list)
    kept = []
    for n in placed:
        cid = group.clusters.get((n["layer"], n["feature"])) if n["kind"] == "feature" else None
        if cid is None or cid in group.expanded:
            kept.append(n)
            continue
        bins[cid].append(n)
        where[n["node_id"]] = f"S:{cid}"
    for cid, members in bins.items():
        weights = [abs(m.get("score") or 0.0) or 1.0 for m in members]
        total = sum(weights)
        scores = [m.get("score") for m in members]
        ranked = sorted(members, key=lambda m: -abs(m.get("score") or 0.0) if m.get("score") is not None
                        else -group.fap.get((m["layer"], m["feature"]), 0.0))
        seen: list[tuple[int, int]] = []
        for m in ranked:
            if (m["layer"], m["feature"]) not in seen:
                seen.append((m["layer"], m["feature"]))
        kept.append({
            "node_id": f"S:{cid}", "kind": SUPERNODE, "cluster": cid, "layer": group.level, "feature": -1,
            "x": sum(w * m["x"] for w, m in zip(weights, members)) / total,
            "y": sum(w * m["y"] for w, m in zip(weights, members)) / total,
            "members": [m["node_id"] for m in members],
            "score": None if all(s is None for s in scores) else float(sum(s or 0.0 for s in scores)),
            "task_fap": float(sum(group.fap.get(k, 0.0) for k in seen)),
            "top": [(l, f, explanations.get(f"{l}_{f}")) for l, f in seen[:5]],
            "n_features": len(seen), "cluster_size": len(group.members.get(cid, [])),
            **{k: group.effects.get(cid, {}).get(k) for k in ("predicted", "measured", "mass")}})
    summed: dict[tuple[str, str], float] = defaultdict(float)
    for link in links:
        s, t = where.get(link["source"], link["source"]), where.get(link["target"], link["target"])
        if s != t:
            summed[(s, t)] += float(link["weight"])
    return kept, [{"source": s, "target": t, "weight": w} for (s, t), w in summed.items() if w != 0]


def tree_figure(result: dict[str, Any], level: int | None = None) -> go.Figure:
    """An icicle of the hierarchy's levels (top = root's children), box size = members (features
    and the input tokens HAGD clusters with them),
    colour = the measured effect where stored, else the predicted one, else the attribution mass.

    The levels >= 1 are drawn (level 0 is one box per node).
    """
    levels = result["hierarchy"]["levels"]
    effects = cluster_effects(result)
    top = len(levels) - 1
    ids, parents, labels, values, colors, hover = ["root"], [""], ["all"], [0], [0.0], ["the whole graph"]
    use = "measured" if any(e["measured"] is not None for e in effects.values()) else (
        "predicted" if any(e["predicted"] is not None for e in effects.values()) else "mass")
    for l in range(top, 0, -1):
        for c in levels[l]:
            e = effects[c["id"]]
            parent = "root" if l == top else levels[l + 1][c["parent"]]["id"]
            ids.append(c["id"])
            parents.append(parent)
            labels.append(f"{c['id']} ({e['size']})")
            values.append(len(c["members"]))       # sums exactly over children (tokens count too)
            colors.append(float(e[use] or 0.0) if e[use] is not None else 0.0)
            hover.append(f"<b>{c['id']}</b>: {e['size']} features, {len(c['members'])} members<br>predicted (scorer) {_fmt(e['predicted'])}"
                         f"<br>measured (ablation) {_fmt(e['measured'])}<br>attribution mass {_fmt(e['mass'])}")
    values[0] = sum(v for v, p in zip(values, parents) if p == "root")
    fig = go.Figure(go.Icicle(ids=ids, parents=parents, labels=labels, values=values, branchvalues="total",
                              marker={"colors": colors, "colorscale": "Purples", "showscale": True,
                                      "colorbar": {"title": {"text": use}}},
                              text=hover, hovertemplate="%{text}<extra></extra>", maxdepth=top + 1,
                              tiling={"orientation": "v"}, root={"color": "#eeeeee"}))
    fig.update_layout(height=340, margin={"l": 10, "r": 10, "t": 30, "b": 10},
                      title=f"HAGD levels (colour: {use} effect" + (f"; grouping by level {level}" if level else "")
                      + ")")
    return fig


def cluster_rows(result: dict[str, Any], level: int, explanations: dict[str, str] | None = None,
                 in_graph: set[tuple[int, int]] | None = None) -> list[dict[str, Any]]:
    """One row per cluster of `level`: id, features, in this graph, effects, top members' explanations."""
    explanations = explanations or {}
    group = grouping(result, level)
    rows = []
    for cid, keys in group.members.items():
        e = group.effects[cid]
        ranked = sorted(keys, key=lambda k: -abs(group.fap.get(k, 0.0)))
        top = [f"L{l} #{f}: {explanations[f'{l}_{f}']}" if f"{l}_{f}" in explanations else f"L{l} #{f}"
               for l, f in ranked[:3]]
        rows.append({"cluster": cid, "features": len(keys),
                     "in this graph": None if in_graph is None else sum(1 for k in keys if k in in_graph),
                     "predicted": e["predicted"], "measured": e["measured"], "mass": e["mass"],
                     "top members": " · ".join(top)})
    return sorted(rows, key=lambda r: -abs(r["mass"]))


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.3g}"
