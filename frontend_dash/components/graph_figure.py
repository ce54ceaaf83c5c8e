"""Plotly figures of attribution graphs (DESIGN 6), pure functions of the API's graph JSON.

A prompt graph ({"tokens", "nodes": [{node_id, kind, layer, position, feature, activation, score,
token}], "links": [{source, target, weight}]}) is drawn with token positions as columns (labelled
with the prompt's tokens) and layers as rows: input tokens at the bottom (row 0), layer l at row
l + 1, the answer logit on top. Node size grows with |score|; several features at one (layer,
position) share the column side by side. Edges are line segments, one trace per (sign, |weight|
bin) with None separators, the bin setting the opacity. The aggregate graph (features across
prompts, no positions) puts each layer's features side by side, most-shared first.

Both figures fit their container (no fixed height: the page sizes the graph to the viewport),
pan by drag and zoom by wheel. `query` highlights the nodes whose id, "L<layer> #<feature>" or
explanation contains it (a ring); `pinned` node ids get a star; `group` (a HAGD level, see
components/supernodes) draws each collapsed cluster as one supernode.

User text (explanations) goes into hover labels HTML-escaped: Plotly renders a few tags in
labels, so `<b>` in an explanation must arrive as the characters, not as markup.
"""

from __future__ import annotations

import html
import math
from collections import defaultdict
from typing import Any

import plotly.graph_objects as go

from frontend_dash.components.supernodes import SUPER_COLOR, SUPERNODE, Grouping, group_nodes

POSITIVE, NEGATIVE = "#1f77b4", "#d62728"
TOKEN_COLOR, ERROR_COLOR, LOGIT_COLOR = "#7f7f7f", "#c7c7c7", "#2ca02c"
TARGET_KINDS = ("metric", "logit")          # what a graph explains (drawn on top)
HIDDEN_KINDS = ("error", "pruned", "bias")  # shown with the "error nodes" toggle
OPACITY_BINS = (0.15, 0.3, 0.55, 0.9)   # opacity of edges by |weight| / max |weight| quartile
MIN_SIZE, MAX_SIZE = 6.0, 20.0
MATCH_COLOR, PIN_COLOR = "#ff7f0e", "#e6ab02"
SPREAD = 0.8                            # width of a column shared by features at one (layer, pos)
HOVER_TEXT_CHARS = 160


def feature_key(layer: int, feature: int) -> str:
    """The key of a feature in explanation maps: "layer_feature"."""
    return f"{layer}_{feature}"


def _escape(text: Any, limit: int = HOVER_TEXT_CHARS) -> str:
    text = str(text)
    if len(text) > limit:
        text = text[:limit - 1] + "…"
    return html.escape(text)


def _size(value: float | None, top: float) -> float:
    if not value or top <= 0:
        return MIN_SIZE
    return MIN_SIZE + (MAX_SIZE - MIN_SIZE) * math.sqrt(min(abs(value) / top, 1.0))


def n_layers_of(graph: dict[str, Any]) -> int:
    """Layers of the model: stored, else read off the target (at layer n_layers + 1; 0 when none)."""
    if graph.get("n_layers") is not None:
        return int(graph["n_layers"])
    return max((n["layer"] - 1 for n in graph["nodes"] if n["kind"] in TARGET_KINDS), default=0)


def layout_prompt_nodes(graph: dict[str, Any], show_errors: bool = False) -> list[dict[str, Any]]:
    """The displayed nodes of a prompt graph with their plot coordinates `x`, `y` added.

    The pruned and bias nodes (no position) sit left of the first token, on the token row."""
    nodes = [n for n in graph["nodes"] if show_errors or n["kind"] not in HIDDEN_KINDS]
    cells: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for n in nodes:
        cells[(n["layer"], n["position"])].append(n)
    placed = []
    for (layer, position), members in cells.items():
        members = sorted(members, key=lambda n: (n["kind"] != "feature", -abs(n.get("score") or 0.0), n["node_id"]))
        count = len(members)
        for i, n in enumerate(members):
            offset = 0.0 if count == 1 else (i / (count - 1) - 0.5) * SPREAD
            placed.append({**n, "x": position + offset, "y": layer + 1})
    return placed


def layout_aggregate_nodes(aggregate: dict[str, Any]) -> list[dict[str, Any]]:
    """Aggregate nodes with coordinates: per layer, side by side by n_prompts (most first)."""
    by_layer: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for n in aggregate["nodes"]:
        by_layer[n["layer"]].append(n)
    widest = max((len(v) for v in by_layer.values()), default=1)
    placed = []
    for layer, members in by_layer.items():
        members = sorted(members, key=lambda n: (-n.get("n_prompts", 0), n["feature"]))
        start = (widest - len(members)) / 2
        for i, n in enumerate(members):
            placed.append({**n, "x": start + i, "y": layer + 1})
    return placed


def edge_traces(links: list[dict[str, Any]], coords: dict[str, tuple[float, float]],
                threshold: float = 0.0) -> list[dict[str, Any]]:
    """One line-segment trace (a plain dict: cheap for thousands of links) per (sign, opacity bin)
    for links between displayed nodes.

    threshold: the fraction of the largest |weight| (among drawable links) below which a link
    is hidden (0 shows all, 1 only the strongest).
    """
    drawable = [l for l in links if l["source"] in coords and l["target"] in coords and l["weight"] != 0]
    if not drawable:
        return []
    top = max(abs(l["weight"]) for l in drawable)
    segments: dict[tuple[bool, int], tuple[list, list]] = {}
    for link in drawable:
        rel = abs(link["weight"]) / top
        if rel < threshold:
            continue
        b = min(int(rel * len(OPACITY_BINS)), len(OPACITY_BINS) - 1)
        xs, ys = segments.setdefault((link["weight"] > 0, b), ([], []))
        (x0, y0), (x1, y1) = coords[link["source"]], coords[link["target"]]
        xs.extend((x0, x1, None))
        ys.extend((y0, y1, None))
    traces = []
    for (positive, b), (xs, ys) in sorted(segments.items()):
        traces.append(dict(type="scatter", x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                 line={"width": 1 + b * 0.8, "color": POSITIVE if positive else NEGATIVE},
                                 opacity=OPACITY_BINS[b], name=f"edges {'+' if positive else '-'} bin {b}"))
    return traces


def _supernode_hover(n: dict[str, Any]) -> str:
    lines = [f"<b>supernode {_escape(n['cluster'])}</b>: {n['n_features']} feature(s) here "
             f"({len(n['members'])} node(s)) of {n['cluster_size']} in the cluster"]
    if n.get("score") is not None:
        lines.append(f"summed attribution {n['score']:.4g}")
    lines.append(f"summed FAP over the task (HAGD graph) {n['task_fap']:.4g}")
    for key, name in (("predicted", "predicted effect (scorer)"), ("measured", "measured effect (ablation)"),
                      ("mass", "attribution mass")):
        if n.get(key) is not None:
            lines.append(f"{name} {n[key]:.3g}")
    for layer, feature, text in n["top"]:
        lines.append(f"L{layer} #{feature}: {_escape(text, 90) if text else 'no explanation yet'}")
    lines.append("click to expand")
    return "<br>".join(lines)


def _node_hover(n: dict[str, Any], explanations: dict[str, str]) -> str:
    kind = n["kind"]
    if kind == SUPERNODE:
        return _supernode_hover(n)
    if kind == "feature":
        lines = [f"<b>feature L{n['layer']} #{n['feature']}</b>"]
        if "position" in n:
            lines.append(f"at {n['position']} {_escape(repr(n.get('token', '')), 40)}")
        if n.get("score") is not None:
            lines.append(f"score {n['score']:.4g}")
        if n.get("activation") is not None:
            lines.append(f"activation {n['activation']:.4g}")
        if "n_prompts" in n:
            lines.append(f"kept on {n['n_prompts']} prompt(s)")
        if n.get("label"):  # an imported graph's own label (Neuronpedia's clerp)
            lines.append(f"label: {_escape(n['label'])}")
        text = explanations.get(feature_key(n["layer"], n["feature"]))
        lines.append(f"explanation: {_escape(text)}" if text else "no explanation yet")
        return "<br>".join(lines)
    if kind == "token":
        return f"token {_escape(repr(n.get('token', '')), 40)} at {n['position']}"
    if kind == "error":
        return f"error term L{n['layer']} at {n['position']}"
    if kind in ("pruned", "bias"):
        return f"<b>{kind}</b>: {_escape(n.get('label', ''))}"
    prob = n.get("token_prob")
    value = n.get("value")
    if n.get("label"):
        title = f"<b>{_escape(n['label'], 80)}</b>"
    else:
        title = f"<b>answer logit</b> {_escape(repr(n.get('token', n.get('feature'))), 40)}"
    return (title + (f"<br>value {value:.4g}" if value is not None else "")
            + (f"<br>p(answer) {prob:.3f}" if prob is not None else ""))


def node_traces(nodes: list[dict[str, Any]], explanations: dict[str, str]) -> list[dict[str, Any]]:
    """Markers by kind; each point's customdata is [node_id, kind, layer, feature]."""
    top = max((abs(n.get("score") or 0.0) for n in nodes if n["kind"] == "feature"), default=0.0)
    top_prompts = max((n.get("n_prompts", 0) for n in nodes if n["kind"] == "feature"), default=0)
    styles = {"token": ("square", TOKEN_COLOR), "error": ("x", ERROR_COLOR), "pruned": ("x-open", ERROR_COLOR),
              "bias": ("cross", ERROR_COLOR), "logit": ("diamond", LOGIT_COLOR), "metric": ("diamond", LOGIT_COLOR)}
    traces = []
    for kind in ("token", "error", "pruned", "bias", SUPERNODE, "feature", "metric", "logit"):
        members = [n for n in nodes if n["kind"] == kind]
        if not members:
            continue
        if kind == SUPERNODE:
            top_super = max((abs(n.get("score") if n.get("score") is not None else n["task_fap"]) for n in members),
                            default=0.0)
            sizes = [MAX_SIZE * 0.8 + 14 * math.sqrt(min(abs(n.get("score") if n.get("score") is not None
                                                             else n["task_fap"]) / top_super, 1.0))
                     if top_super > 0 else MAX_SIZE for n in members]
            traces.append(dict(
                type="scatter", x=[n["x"] for n in members], y=[n["y"] for n in members], mode="markers+text",
                name="supernode", text=[_node_hover(n, explanations) for n in members],
                textposition="middle center", texttemplate=[str(len(n["members"])) for n in members],
                textfont={"color": "white", "size": 10},
                marker={"size": sizes, "color": SUPER_COLOR, "symbol": "hexagon", "opacity": 0.85,
                        "line": {"width": 1, "color": "#3f2a5c"}},
                customdata=[[n["node_id"], SUPERNODE, n["layer"], n["cluster"], ",".join(n["members"])]
                            for n in members],
                hovertemplate="%{text}<extra></extra>"))
            continue
        if kind == "feature":
            if any("n_prompts" in n for n in members):
                sizes = [_size(n.get("n_prompts", 0), top_prompts) for n in members]
                colors = [POSITIVE for _ in members]
            else:
                sizes = [_size(n.get("score"), top) for n in members]
                colors = [NEGATIVE if (n.get("score") or 0.0) < 0 else POSITIVE for n in members]
            symbol = "circle"
        else:
            symbol, color = styles[kind]
            sizes = [MAX_SIZE * 0.7 if kind in TARGET_KINDS else MIN_SIZE + 3] * len(members)
            colors = [color] * len(members)
        traces.append(dict(
            type="scatter", x=[n["x"] for n in members], y=[n["y"] for n in members], mode="markers", name=kind,
            marker={"size": sizes, "color": colors, "symbol": symbol, "line": {"width": 0.5, "color": "#333"}},
            customdata=[[n["node_id"], kind, n["layer"], n["feature"]] for n in members],
            text=[_node_hover(n, explanations) for n in members],
            hovertemplate="%{text}<extra></extra>"))
    return traces


def _layer_axis(n_layers: int, with_tokens: bool) -> dict[str, Any]:
    """Rows: tokens 0, layer l at l + 1, the logit (node layer n_layers + 1) at n_layers + 2."""
    rows = ([0] if with_tokens else []) + [l + 1 for l in range(n_layers)] + [n_layers + 2]
    labels = (["tokens"] if with_tokens else []) + [f"L{l}" for l in range(n_layers)] + ["target"]
    return {"tickvals": rows, "ticktext": labels, "range": [rows[0] - 0.6, rows[-1] + 0.6],
            "zeroline": False, "showgrid": True}


def search_nodes(nodes: list[dict[str, Any]], explanations: dict[str, str], query: str | None) -> set[str]:
    """Ids of the feature nodes whose node id, "L<layer> #<feature>" or explanation contains
    `query` (case-insensitive; empty matches nothing)."""
    q = (query or "").strip().lower()
    if not q:
        return set()
    found = set()
    for n in nodes:
        if n["kind"] != "feature":
            continue
        text = explanations.get(feature_key(n["layer"], n["feature"]), "")
        if (q in n["node_id"].lower() or q in f"l{n['layer']} #{n['feature']}" or q in text.lower()
                or q in str(n.get("label", "")).lower()):
            found.add(n["node_id"])
    return found


def _marks(nodes: list[dict[str, Any]], ids: set[str], name: str, symbol: str, color: str, size: float) -> list[dict]:
    """An overlay trace ringing the displayed nodes that are, or stand for (supernodes), `ids`."""
    shown = [n for n in nodes if n["node_id"] in ids or (n["kind"] == SUPERNODE and ids.intersection(n["members"]))]
    if not shown:
        return []
    return [dict(type="scatter", x=[n["x"] for n in shown], y=[n["y"] for n in shown], mode="markers", name=name,
                 hoverinfo="skip", showlegend=True,
                 marker={"size": size, "symbol": symbol, "color": color, "line": {"width": 2.5, "color": color}})]


def _traces(nodes: list[dict[str, Any]], links: list[dict[str, Any]], explanations: dict[str, str], threshold: float,
            group: Grouping | None, matches: set[str], pinned: set[str]) -> list[dict[str, Any]]:
    if group is not None:
        nodes, links = group_nodes(nodes, links, group, explanations)
    coords = {n["node_id"]: (n["x"], n["y"]) for n in nodes}
    return (edge_traces(links, coords, threshold) + node_traces(nodes, explanations)
            + _marks(nodes, matches, "search matches", "circle-open", MATCH_COLOR, MAX_SIZE + 10)
            + _marks(nodes, pinned, "pinned", "star-open", PIN_COLOR, MAX_SIZE + 4))


def _build(traces: list[dict[str, Any]], layout: dict[str, Any], height: int | None,
           as_dict: bool) -> go.Figure | dict[str, Any]:
    """A go.Figure, or with `as_dict` the same figure as a plain dict: the pages send that,
    because validating an 800-node figure into plotly objects costs seconds.

    height: fixed, or None: the figure then fills its container (sized by the page)."""
    layout = {**layout, **({"height": height} if height is not None else {"autosize": True})}
    if as_dict:
        return {"data": traces, "layout": layout}
    return go.Figure(data=traces, layout=layout)


def _common_layout(title: str) -> dict[str, Any]:
    return {"title": {"text": title} if title else None, "plot_bgcolor": "white", "hovermode": "closest",
            "clickmode": "event", "dragmode": "pan",
            "legend": {"orientation": "h", "y": 1.0, "yanchor": "bottom", "x": 0, "xanchor": "left"}}


def graph_figure(graph: dict[str, Any], *, explanations: dict[str, str] | None = None,
                 threshold: float = 0.0, show_errors: bool = False, title: str = "",
                 group: Grouping | None = None, query: str | None = None, pinned: set[str] | None = None,
                 height: int | None = None, as_dict: bool = False) -> go.Figure | dict[str, Any]:
    """The attribution graph of one prompt (see the module docstring for group, query, pinned)."""
    explanations = explanations or {}
    placed = layout_prompt_nodes(graph, show_errors)
    traces = _traces(placed, graph["links"], explanations, threshold, group,
                     search_nodes(placed, explanations, query), set(pinned or ()))
    tokens = graph.get("tokens", [])
    layout = {**_common_layout(title), "margin": {"l": 50, "r": 10, "t": 30 if title else 10, "b": 80},
              "xaxis": {"tickvals": list(range(len(tokens))), "ticktext": [_escape(t, 20) for t in tokens],
                        "tickangle": -45, "range": [-1.7 if show_errors else -0.7, max(len(tokens), 1) - 0.3],
                        "zeroline": False, "showgrid": False, "automargin": True},
              "yaxis": _layer_axis(n_layers_of(graph), with_tokens=True)}
    return _build(traces, layout, height, as_dict)


def aggregate_figure(aggregate: dict[str, Any], *, explanations: dict[str, str] | None = None,
                     threshold: float = 0.0, title: str = "", group: Grouping | None = None,
                     query: str | None = None, pinned: set[str] | None = None,
                     height: int | None = 420, as_dict: bool = False) -> go.Figure | dict[str, Any]:
    """Features across all prompts (node size: how many prompts kept the feature)."""
    explanations = explanations or {}
    placed = layout_aggregate_nodes(aggregate)
    n_layers = max((n["layer"] - 1 for n in placed if n["kind"] in TARGET_KINDS), default=0)
    traces = _traces(placed, aggregate["links"], explanations, threshold, group,
                     search_nodes(placed, explanations, query), set(pinned or ()))
    layout = {**_common_layout(title), "margin": {"l": 50, "r": 10, "t": 30 if title else 10, "b": 20},
              "xaxis": {"showticklabels": False, "zeroline": False, "showgrid": False},
              "yaxis": _layer_axis(n_layers, with_tokens=False)}
    return _build(traces, layout, height, as_dict)


def clicked_node(click_data: dict[str, Any] | None) -> list[Any] | None:
    """customdata [node_id, kind, layer, feature-or-cluster] of a clicked node marker, else None."""
    if not click_data or not click_data.get("points"):
        return None
    custom = click_data["points"][0].get("customdata")
    return list(custom) if custom and len(custom) >= 4 else None


def clicked_feature(click_data: dict[str, Any] | None) -> tuple[int, int] | None:
    """(layer, feature) of a clicked feature node in a graph figure's clickData, else None."""
    if not click_data or not click_data.get("points"):
        return None
    custom = click_data["points"][0].get("customdata")
    if not custom or len(custom) < 4 or custom[1] != "feature":
        return None
    return int(custom[2]), int(custom[3])


def graph_key_label(key: str) -> str:
    """A stored graph's key for people: "all" -> "all prompts", "3" -> "prompt 3", "...@logit" -> "... (logit)"."""
    base, _, target = key.partition("@")
    text = "all prompts" if base == "all" else f"prompt {base}"
    return f"{text} ({target})" if target else text


def stored_graphs(circuit: dict[str, Any]) -> tuple[dict[int, tuple[str, dict[str, Any]]], dict[str, Any] | None]:
    """The circuit's computed graphs: prompt index -> (graph key, prompt graph), and the aggregate.

    A prompt may appear under "all" and under its own key; its own key wins (computed later for
    just that prompt). Graphs of the metric win over graphs of the answer logit (keys "...@logit"),
    which are drawn only where no metric graph is stored. The aggregate is the one of "all" when
    computed, else of any stored key.
    """
    stored = circuit.get("graphs") or {}
    per_prompt: dict[int, tuple[str, dict[str, Any]]] = {}
    for key in sorted(stored, key=lambda k: ("@" not in k, k.split("@")[0] != "all", k)):
        for g in stored[key].get("graphs", []):
            per_prompt[int(g["prompt"])] = (key, g)
    aggregate = None
    for key in sorted(stored, key=lambda k: ("@" in k, k.split("@")[0] != "all", k)):
        if stored[key].get("aggregate"):
            aggregate = stored[key]["aggregate"]
            break
    return per_prompt, aggregate
