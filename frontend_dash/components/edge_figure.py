"""Edge circuits drawn by layer (pure functions of the stored EdgeCircuit JSON).

Layout: the embedding at the bottom, the logits at the top, and per layer l one band holding
its heads as a small grid with the MLP beside them (DESIGN 8.1's writers and readers). An edge
``writer->reader`` leaves the writer's node and enters its reader: a query input enters its
head's node at the left, a key or value input its kv head (with grouped-query attention a small
diamond in a row under the layer's heads, kv head g of G at the g-th of G slots; otherwise the
head itself, middle and right).

The figure is split in two so the browser can re-threshold without a server round trip:
`node_traces` (static, with hover text) and `edge_payload` (every kept edge's end points,
score and id, strongest first). `THRESHOLD_JS` is the clientside function that draws the
top-n edges from the payload: binned by sign and |score| into path shapes (width and opacity
grow with |score|), plus an invisible marker at each edge's midpoint carrying its hover text.
`threshold_figure` is the same in Python; `edges_drawn(figure)` counts what a figure draws.

Text from the store (tokens, ids) is HTML-escaped before it goes into hover labels or tick
labels: Plotly renders a few tags there.
"""

from __future__ import annotations

import html
import math
import re
from typing import Any

import plotly.graph_objects as go

POS, NEG, NONE = "#1f77b4", "#d62728", "#7f7f7f"
BINS = (0.0, 0.25, 0.6)       # |score| / max |score| lower edges of the width bins
WIDTHS = (0.6, 1.4, 2.8)
OPACITY = (0.25, 0.5, 0.85)
HEAD_BAND = 0.3               # heads sit within layer +- HEAD_BAND
_WRITER = re.compile(r"^a(\d+)\.h(\d+)$")
_READER = re.compile(r"^a(\d+)\.(q|k|v)(\d+)$")
_MLP = re.compile(r"^m(\d+)$")


def escape(text: Any, limit: int = 80) -> str:
    text = str(text)
    return html.escape(text if len(text) <= limit else text[: limit - 1] + "…")


def token_label(token: str) -> str:
    """A token as a visible, escaped label (quotes keep leading spaces visible)."""
    return escape(repr(token), 24)


def graph_shape(counts: dict[str, int]) -> tuple[int, int, int]:
    """(n_layers, n_heads, n_kv_heads) from an edge graph's counts.

    writers W = 1 + L(H+1); q edges = H * S and k edges = G * S with S = sum over layers l of
    the writers before layer l's attention, 1 + l(H+1): the one L dividing W - 1 that fits.
    """
    w, q, k = counts["writers"], counts["q"], counts["k"]
    for n_layers in range(1, w):
        if (w - 1) % n_layers:
            continue
        n_heads = (w - 1) // n_layers - 1
        if n_heads < 1:
            continue
        s = n_layers + (n_heads + 1) * n_layers * (n_layers - 1) // 2
        if n_heads * s == q and k % s == 0 and k // s >= 1:
            return n_layers, n_heads, k // s
    raise ValueError(f"these counts are not an edge graph's: {counts}")


def grid(n_heads: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(n_heads))
    return cols, math.ceil(n_heads / cols)


def node_positions(n_layers: int, n_heads: int, n_kv_heads: int) -> dict[str, tuple[float, float]]:
    """Node name -> (x, y): "embed", "logits", "a{l}.h{h}", "m{l}", and "a{l}.kv{g}" under GQA."""
    cols, rows = grid(n_heads)
    centre = (cols - 1) / 2
    pos: dict[str, tuple[float, float]] = {"embed": (centre, 0.0), "logits": (centre, n_layers + 1.0)}
    per_kv = n_heads // n_kv_heads
    for layer in range(n_layers):
        y = layer + 1.0
        for h in range(n_heads):
            r, c = divmod(h, cols)
            dy = 0.0 if rows == 1 else -HEAD_BAND + 2 * HEAD_BAND * r / (rows - 1)
            pos[f"a{layer}.h{h}"] = (float(c), y + dy)
        pos[f"m{layer}"] = (cols + 0.4, y)
        if per_kv > 1:  # a row under the grid, spread over its width
            for g in range(n_kv_heads):
                pos[f"a{layer}.kv{g}"] = ((g + 0.5) * cols / n_kv_heads - 0.5, y - HEAD_BAND - 0.2)
    return pos


def endpoints(edge_id: str, pos: dict[str, tuple[float, float]], per_kv: int) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of an edge: from the top of its writer to its reader's entry point."""
    writer, reader = edge_id.split("->")
    x0, y0 = pos[writer]
    if _WRITER.match(writer):
        y0 += 0.06
    m = _READER.match(reader)
    if m is None:
        x1, y1 = pos[reader]
        return x0, y0, x1, y1
    layer, kind, i = int(m.group(1)), m.group(2), int(m.group(3))
    if kind == "q":
        x1, y1 = pos[f"a{layer}.h{i}"]
        return x0, y0, x1 - 0.12, y1 - 0.06
    if per_kv > 1:
        x1, y1 = pos[f"a{layer}.kv{i}"]
        return x0, y0, x1 + (-0.05 if kind == "k" else 0.05), y1
    x1, y1 = pos[f"a{layer}.h{i}"]
    return x0, y0, x1 + (0.0 if kind == "k" else 0.12), y1 - 0.06


def edge_payload(result: dict[str, Any]) -> dict[str, Any]:
    """Every kept edge, strongest |score| first: end points, score (None when the method gives
    none), id; plus the graph's size. What the clientside threshold function reads."""
    n_layers, n_heads, n_kv = graph_shape(result["graph"])
    pos = node_positions(n_layers, n_heads, n_kv)
    kept = sorted(result["kept"], key=lambda e: -abs(e["score"]) if e.get("score") is not None else 0.0)
    x0, y0, x1, y1 = [], [], [], []
    for e in kept:
        a, b, c, d = endpoints(e["id"], pos, n_heads // n_kv)
        x0.append(round(a, 3)), y0.append(round(b, 3)), x1.append(round(c, 3)), y1.append(round(d, 3))
    scores = [e.get("score") for e in kept]
    finite = [abs(s) for s in scores if s is not None]
    return {"x0": x0, "y0": y0, "x1": x1, "y1": y1, "score": scores, "id": [escape(e["id"]) for e in kept],
            "max": max(finite) if finite else 1.0, "n_edges": result["graph"]["edges"],
            "bins": list(BINS), "widths": list(WIDTHS), "opacity": list(OPACITY), "colors": [POS, NEG, NONE],
            "max_hover": MAX_HOVER}


def _attention_lines(summary: dict[str, Any] | None, tokens: dict[int, tuple[int, list[str]]],
                     prompts: int = 4) -> list[str]:
    """tokens: prompt index -> (offset, its stored tokens), to name the query position."""
    if not summary:
        return []
    lines = []
    for t in summary["top"][:prompts]:
        offset, toks = tokens.get(t["prompt"], (0, []))
        q = t["query"] - offset
        query = f" {token_label(toks[q])}" if 0 <= q < len(toks) else ""
        lines.append(f"prompt {t['prompt']}: pos {t['query']}{query} → pos {t['key']} {token_label(t['token'])} "
                     f"({t['weight']:.2f})")
    if len(summary["top"]) > prompts:
        lines.append(f"… {len(summary['top']) - prompts} more prompts")
    return lines


def node_traces(result: dict[str, Any], attention: dict[str, Any] | None = None) -> list[go.Scatter]:
    """Head, MLP, kv, embedding and logits markers. Nodes a kept edge touches are drawn dark;
    a head's hover says where the last position attends most on the first prompts."""
    n_layers, n_heads, n_kv = graph_shape(result["graph"])
    pos = node_positions(n_layers, n_heads, n_kv)
    degree: dict[str, int] = {}
    per_kv = n_heads // n_kv
    for e in result["kept"]:
        writer, reader = e["id"].split("->")
        degree[writer] = degree.get(writer, 0) + 1
        m = _READER.match(reader)
        if m:
            layer, kind, i = int(m.group(1)), m.group(2), int(m.group(3))
            name = f"a{layer}.h{i}" if kind == "q" or per_kv == 1 else f"a{layer}.kv{i}"
        else:
            name = reader
        degree[name] = degree.get(name, 0) + 1
    summaries = {h["head"]: h for h in (attention or {}).get("heads", [])}
    tokens = {p["index"]: (p.get("offset", 0), p["tokens"]) for p in (attention or {}).get("prompts", [])}
    traces = []
    groups = (("head", lambda n: bool(_WRITER.match(n)), "square", 16),
              ("kv head", lambda n: ".kv" in n, "diamond", 9),
              ("mlp", lambda n: bool(_MLP.match(n)), "circle", 18),
              ("embed / logits", lambda n: n in ("embed", "logits"), "hexagon", 22))
    for name, member, symbol, size in groups:
        names = [n for n in pos if member(n)]
        if not names:
            continue
        text = []
        for n in names:
            lines = [f"<b>{escape(n)}</b>", f"{degree.get(n, 0)} kept edge(s)"]
            if name == "head":
                if n in summaries:
                    lines += ["last position attends most to:"] + _attention_lines(summaries[n], tokens) + ["click: patterns"]
                elif attention is not None and degree.get(n):
                    lines.append("no attention stored for this head")
            text.append("<br>".join(lines))
        traces.append(go.Scatter(
            x=[pos[n][0] for n in names], y=[pos[n][1] for n in names], mode="markers", name=name,
            marker={"symbol": symbol, "size": size, "line": {"width": 1, "color": "#333"},
                    "color": ["#4c4c4c" if degree.get(n) else "#e0e0e0" for n in names]},
            text=text, hovertemplate="%{text}<extra></extra>", customdata=[[name, n] for n in names],
            showlegend=False))
    return traces


def base_figure(result: dict[str, Any], attention: dict[str, Any] | None = None) -> go.Figure:
    """The static part: nodes and axes (layers on y, embedding at the bottom, logits on top)."""
    n_layers, n_heads, _ = graph_shape(result["graph"])
    cols, _ = grid(n_heads)
    fig = go.Figure(node_traces(result, attention))
    fig.update_layout(
        height=max(420, 52 * (n_layers + 2) + 80), width=max(640, 170 * (cols + 2) + 120),
        plot_bgcolor="white", hovermode="closest", dragmode="pan",
        margin={"l": 70, "r": 20, "t": 30, "b": 30}, showlegend=False, uirevision="edges",
        xaxis={"visible": False, "range": [-0.8, cols + 1.2]},
        yaxis={"tickvals": list(range(n_layers + 2)), "zeroline": False, "gridcolor": "#f0f0f0",
               "ticktext": ["embed"] + [f"L{l}" for l in range(n_layers)] + ["logits"], "range": [-0.6, n_layers + 1.6]})
    return fig


def edges_drawn(figure: dict[str, Any]) -> int:
    """How many edges a figure draws: the move-to commands of its edge path shapes."""
    return sum(sh["path"].count("M") for sh in figure["layout"].get("shapes") or () if sh.get("name") == "edges")


# The clientside threshold: (n shown, payload, base figure) -> (figure, caption). Mirrors
# `threshold_figure` below; the payload is sorted strongest first, so the top n are its first n.
# Edges are drawn as one SVG path per (sign, width bin) layout shape ("M x0,y0 L x1,y1 M ..."):
# Plotly draws a line trace with thousands of gaps ten times slower. Hover markers (one per edge,
# at its midpoint, invisible) are SVG nodes, so only the strongest MAX_HOVER shown edges get one.
MAX_HOVER = 1000
THRESHOLD_JS = """
function(n, payload, base) {
    if (!payload || !base) { return [window.dash_clientside.no_update, ""]; }
    const total = payload.x0.length;
    n = Math.max(0, Math.min(total, Math.round(n || 0)));
    const paths = {};
    const hover = {};
    for (let i = 0; i < n; i++) {
        const s = payload.score[i];
        const sign = s === null ? 2 : (s >= 0 ? 0 : 1);
        const rel = s === null ? 1 : Math.abs(s) / payload.max;
        let bin = 0;
        for (let b = 0; b < payload.bins.length; b++) { if (rel >= payload.bins[b]) { bin = b; } }
        const key = sign + ":" + bin;
        if (!paths[key]) { paths[key] = {sign: sign, bin: bin, parts: []}; }
        paths[key].parts.push("M" + payload.x0[i] + "," + payload.y0[i] + "L" + payload.x1[i] + "," + payload.y1[i]);
        if (i >= payload.max_hover) { continue; }
        if (!hover[sign]) {
            hover[sign] = {type: "scatter", mode: "markers", x: [], y: [], text: [], showlegend: false,
                           legendgroup: "edge-hover", marker: {size: 6, opacity: 0, color: payload.colors[sign]},
                           hovertemplate: "%{text}<extra></extra>"};
        }
        const h = hover[sign];
        h.x.push((payload.x0[i] + payload.x1[i]) / 2);
        h.y.push((payload.y0[i] + payload.y1[i]) / 2);
        h.text.push(payload.id[i] + "<br>score " + (s === null ? "n/a" : s.toPrecision(4)));
    }
    const shapes = Object.values(paths).map(p => ({
        type: "path", name: "edges", xref: "x", yref: "y", layer: "below", path: p.parts.join(""),
        opacity: payload.opacity[p.bin], line: {color: payload.colors[p.sign], width: payload.widths[p.bin]}}));
    const layout = Object.assign({}, base.layout, {shapes: shapes});
    const sparsity = 100 * (1 - n / payload.n_edges);
    let caption = "showing " + n + " of " + total + " kept edges (strongest |score| first) · " +
                  sparsity.toFixed(2) + "% sparsity of the " + payload.n_edges + "-edge graph";
    if (n > payload.max_hover) { caption += " · hover shows the " + payload.max_hover + " strongest"; }
    return [{data: Object.values(hover).concat(base.data), layout: layout}, caption];
}
"""


def threshold_figure(payload: dict[str, Any], base: dict[str, Any], n: int) -> dict[str, Any]:
    """The figure THRESHOLD_JS draws for the top n edges (its edge shapes), in Python: for
    tests, and to say what the browser draws."""
    n = max(0, min(len(payload["x0"]), int(n)))
    parts: dict[tuple[int, int], list[str]] = {}
    for i in range(n):
        s = payload["score"][i]
        sign = 2 if s is None else (0 if s >= 0 else 1)
        rel = 1.0 if s is None else abs(s) / payload["max"]
        b = max(j for j, lo in enumerate(payload["bins"]) if rel >= lo)
        parts.setdefault((sign, b), []).append(
            f"M{payload['x0'][i]},{payload['y0'][i]}L{payload['x1'][i]},{payload['y1'][i]}")
    shapes = [{"type": "path", "name": "edges", "xref": "x", "yref": "y", "layer": "below", "path": "".join(p),
               "opacity": payload["opacity"][b], "line": {"color": payload["colors"][sign], "width": payload["widths"][b]}}
              for (sign, b), p in parts.items()]
    return {"data": list(base["data"]), "layout": {**base["layout"], "shapes": shapes}}


# ------------------------------------------------------------------------------ attention heatmaps

def attention_figure(head: dict[str, Any], prompt: dict[str, Any], pattern: list[list[float]]) -> go.Figure:
    """One head's pattern on one prompt: keys on x, queries on y, both labelled by their tokens."""
    offset = prompt.get("offset", 0)
    positions = list(range(offset, offset + len(prompt["tokens"])))
    labels = [f"{p} {token_label(t)}" for p, t in zip(positions, prompt["tokens"])]
    fig = go.Figure(go.Heatmap(
        z=pattern, x=positions, y=positions, colorscale="Blues", zmin=0, zmax=1, showscale=False,
        customdata=[[[labels[q], labels[k]] for k in range(len(labels))] for q in range(len(labels))],
        hovertemplate="query %{customdata[0]}<br>key %{customdata[1]}<br>p = %{z:.3f}<extra></extra>"))
    size = max(260, min(520, 18 * len(positions) + 140))
    fig.update_layout(
        title={"text": f"{escape(head['head'])} · prompt {prompt['index']}", "font": {"size": 13}},
        width=size, height=size, margin={"l": 110, "r": 10, "t": 40, "b": 110},
        xaxis={"tickvals": positions, "ticktext": labels, "tickangle": -60, "title": "key", "tickfont": {"size": 9}},
        yaxis={"tickvals": positions, "ticktext": labels, "autorange": "reversed", "title": "query",
               "tickfont": {"size": 9}})
    return fig


def clicked_head(click: dict[str, Any] | None) -> str | None:
    """The head id of a click on a head marker, else None."""
    if not click or not click.get("points"):
        return None
    data = click["points"][0].get("customdata")
    if isinstance(data, list) and len(data) == 2 and data[0] == "head":
        return data[1]
    return None
