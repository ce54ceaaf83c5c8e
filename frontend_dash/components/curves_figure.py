"""Faithfulness curves across methods (pure functions of API JSON).

`edge_sweep_figure`: an edge sweep's KL(full || circuit) and logit difference recovered against
edges kept (log x), one line per method with its bootstrap 95% CI band, each method's time in
the legend. `overview_figure`: the task overview (GET /api/task-overview) on two subplots that
never share an axis: feature methods (PIE, HAGD) against features kept, edge methods against
edges kept; one line per method, its cost in the legend.
"""

from __future__ import annotations

import html
from typing import Any

import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

PALETTE = px.colors.qualitative.Plotly + px.colors.qualitative.Dark24


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def seconds_label(seconds: float | None) -> str:
    if seconds is None:
        return "time n/a"
    return f"{seconds:.3g} s" if seconds < 100 else f"{seconds / 60:.1f} min"


def band(x: list[float], low: list[float | None], high: list[float | None], color: str, group: str) -> go.Scatter | None:
    """A shaded band between low and high (points without both ends are left out)."""
    pts = [(a, lo, hi) for a, lo, hi in zip(x, low, high) if lo is not None and hi is not None]
    if len(pts) < 1:
        return None
    xs = [p[0] for p in pts]
    return go.Scatter(x=xs + xs[::-1], y=[p[2] for p in pts] + [p[1] for p in pts][::-1], mode="lines",
                      fill="toself", fillcolor=_rgba(color, 0.18), line={"width": 0}, hoverinfo="skip",
                      showlegend=False, legendgroup=group, name=f"{group} band")


# ------------------------------------------------------------------------------ edge sweeps

def sweep_methods(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per method: its rows by edges kept and its total time (sum of its rows' cost)."""
    out = []
    for method in result["methods"]:
        rows = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["n_kept"])
        seconds = sum((r.get("cost") or {}).get("seconds") or 0.0 for r in rows)
        out.append({"method": method, "rows": rows, "seconds": seconds})
    return out


def edge_sweep_figure(result: dict[str, Any]) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=("KL(full || circuit), answer position", "logit difference recovered"))
    for i, m in enumerate(sweep_methods(result)):
        color, name = PALETTE[i % len(PALETTE)], html.escape(m["method"])
        legend = f"{name} ({seconds_label(m['seconds'])})"
        x = [max(r["n_kept"], 1) for r in m["rows"]]
        for col, key in ((1, "kl"), (2, "recovered")):
            stats = [r[key] for r in m["rows"]]
            shade = band(x, [s["ci95"][0] for s in stats], [s["ci95"][1] for s in stats], color, m["method"])
            if shade is not None:
                fig.add_trace(shade, row=1, col=col)
            fig.add_trace(go.Scatter(
                x=x, y=[s["mean"] for s in stats], mode="lines+markers", name=legend, legendgroup=m["method"],
                showlegend=col == 1, line={"color": color},
                customdata=[[r["n_target"], s["ci95"][0], s["ci95"][1], r.get("recovered_of_means")]
                            for r, s in zip(m["rows"], stats)],
                hovertemplate=(f"{name}<br>edges kept %{{x}} (target %{{customdata[0]}})<br>{key} %{{y:.4g}} "
                               "[%{customdata[1]:.4g}, %{customdata[2]:.4g}]"
                               + ("<br>ratio of means %{customdata[3]:.4g}" if key == "recovered" else "")
                               + "<extra></extra>")), row=1, col=col)
    for col in (1, 2):
        fig.update_xaxes(type="log", title_text="edges kept", row=1, col=col)
    fig.update_yaxes(title_text="KL", row=1, col=1)
    fig.update_yaxes(title_text="(M_circuit − M_corr) / (M_clean − M_corr)", row=1, col=2)
    fig.update_layout(
        title=(f"{html.escape(result['model'])} · {html.escape(result['task'])} · N={result['n_prompts']} · "
               f"{result['graph']['edges']} edges; bands: bootstrap 95% CI; legend: time per method"),
        plot_bgcolor="white", height=460, legend={"orientation": "h", "y": -0.22},
        margin={"l": 60, "r": 20, "t": 70, "b": 60})
    return fig


def sweep_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows: method, edges target and kept, KL and recovered with CIs, accuracy, cost."""
    return [{"method": r["method"], "n_target": r["n_target"], "n_kept": r["n_kept"], "kl": r["kl"]["mean"],
             "kl_ci95": r["kl"]["ci95"], "recovered": r["recovered"]["mean"], "recovered_ci95": r["recovered"]["ci95"],
             "recovered_of_means": r.get("recovered_of_means"), "accuracy": r["accuracy"]["mean"],
             "seconds": (r.get("cost") or {}).get("seconds"), "forwards": (r.get("cost") or {}).get("forwards")}
            for r in sorted(result["rows"], key=lambda r: (r["method"], r["n_kept"]))]


# ------------------------------------------------------------------------------ task overview

FAMILIES = (("features", "feature circuits: PIE and HAGD"), ("edges", "edge circuits"))
METRICS = {"recovered": "behaviour recovered (share of the task metric kept)",
           "kl": "KL(full || circuit), last position"}


def overview_figure(overview: dict[str, Any], metric: str = "recovered") -> go.Figure:
    """Every curve of the overview: column 1 the feature family, column 2 the edge family."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=[t for _, t in FAMILIES])
    for i, curve in enumerate(overview["curves"]):
        col = 1 if curve["family"] == "features" else 2
        color, name = PALETTE[i % len(PALETTE)], html.escape(curve["method"])
        pts = [p for p in curve["points"] if p.get(metric) is not None]
        legend = f"{name} ({seconds_label(curve['seconds'])})"
        if not pts:
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=f"{legend}: no {metric}",
                                     legendgroup=curve["method"], line={"color": color, "dash": "dot"}),
                          row=1, col=col)
            continue
        x = [p["x"] for p in pts]
        lows = [(p.get(f"{metric}_ci95") if metric == "kl" else p.get("recovered_band")) or [None, None] for p in pts]
        shade = band(x, [lo[0] for lo in lows], [lo[1] for lo in lows], color, curve["method"])
        if shade is not None:
            fig.add_trace(shade, row=1, col=col)
        fig.add_trace(go.Scatter(
            x=x, y=[p[metric] for p in pts], mode="lines+markers", name=legend, legendgroup=curve["method"],
            line={"color": color}, customdata=[[p.get("seconds")] for p in pts],
            hovertemplate=(f"{name} · {html.escape(curve['source'])}<br>{html.escape(curve['x_unit'])} %{{x}}<br>"
                           f"{metric} %{{y:.4g}}<br>%{{customdata[0]:.3g}} s<extra></extra>")), row=1, col=col)
    fig.update_xaxes(type="log", title_text="features kept (PIE: K per prompt; HAGD: circuit features)", row=1, col=1)
    fig.update_xaxes(type="log", title_text="edges kept", row=1, col=2)
    for col in (1, 2):
        fig.update_yaxes(title_text=METRICS[metric], row=1, col=col)
    fig.update_layout(title=f"{html.escape(overview['model'])} · {html.escape(overview['task'])}: every stored method; "
                            "legend: compute per method", plot_bgcolor="white", height=500,
                      legend={"orientation": "h", "y": -0.22}, margin={"l": 60, "r": 20, "t": 70, "b": 60})
    return fig


def overview_rows(overview: dict[str, Any]) -> list[dict[str, Any]]:
    """The cost table: one row per method with where its points come from."""
    return [{"family": c["family"], "method": c["method"], "source": c["source"], "x_unit": c["x_unit"],
             "points": len(c["points"]), "metric": c["metric"], "band": c["band"], "seconds": c["seconds"]}
            for c in overview["curves"]]


def curve_count(figure: dict[str, Any]) -> int:
    """Method lines in a figure (bands and placeholders aside): the traces shown in the legend."""
    return sum(1 for t in figure["data"] if t.get("showlegend", True) is not False and not t.get("fill"))
