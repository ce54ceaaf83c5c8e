"""KL-vs-K figures of a sweep (DESIGN 5), pure functions of the SweepResult JSON.

`kl_vs_k_figure`: one line per method with its bootstrap 95% CI as a shaded band, K on a log
axis, the random-from-active curve dashed, and each method point labelled with its effective
compression (K_random needed to match the method's KL at K, divided by K).
`compression_rows`: the same compression numbers as table rows.
"""

from __future__ import annotations

from typing import Any

import plotly.express as px
import plotly.graph_objects as go

RANDOM_COLOR = "#555555"


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _band(rows: list[dict[str, Any]], color: str, name: str) -> go.Scatter:
    """The CI band as one closed polygon (upper edge left to right, lower edge back)."""
    ks = [r["k"] for r in rows]
    upper = [r["kl_ci95"][1] for r in rows]
    lower = [r["kl_ci95"][0] for r in rows]
    return go.Scatter(x=ks + ks[::-1], y=upper + lower[::-1], mode="lines", fill="toself", fillcolor=_rgba(color, 0.18),
                      line={"width": 0}, hoverinfo="skip", showlegend=False, legendgroup=name,
                      name=f"{name} 95% CI")


def _compression_label(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}×"


def kl_vs_k_figure(result: dict[str, Any], *, show_random_curve: bool = True) -> go.Figure:
    """KL(clean || circuit) against K for every method of the sweep."""
    palette = px.colors.qualitative.Plotly
    compression = result.get("effective_compression") or {}
    fig = go.Figure()
    for i, method in enumerate(result["methods"]):
        rows = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["k"])
        if not rows:
            continue
        color = palette[i % len(palette)]
        fig.add_trace(_band(rows, color, method))
        labels = [_compression_label((compression.get(method) or {}).get(str(r["k"]))) for r in rows]
        fig.add_trace(go.Scatter(
            x=[r["k"] for r in rows], y=[r["kl_mean"] for r in rows], mode="lines+markers+text", name=method,
            legendgroup=method, line={"color": color}, text=labels, textposition="top right",
            textfont={"size": 10, "color": color},
            customdata=[[r["kl_ci95"][0], r["kl_ci95"][1], r["pred_change_rate"], lab or "n/a"]
                        for r, lab in zip(rows, labels)],
            hovertemplate=(f"{method}<br>K=%{{x}}<br>KL=%{{y:.4g}} [%{{customdata[0]:.4g}}, %{{customdata[1]:.4g}}]"
                           "<br>prediction changed: %{customdata[2]:.2f}<br>effective compression: "
                           "%{customdata[3]}<extra></extra>")))
    curve = sorted(result.get("random_curve") or [], key=lambda r: r["k"])
    if show_random_curve and curve:
        fig.add_trace(_band(curve, RANDOM_COLOR, "random-from-active"))
        fig.add_trace(go.Scatter(x=[r["k"] for r in curve], y=[r["kl_mean"] for r in curve], mode="lines+markers",
                                 name="random-from-active", legendgroup="random-from-active",
                                 line={"color": RANDOM_COLOR, "dash": "dash"},
                                 hovertemplate="random<br>K=%{x}<br>KL=%{y:.4g}<extra></extra>"))
    if result.get("kl_none_mean") is not None:
        fig.add_hline(y=result["kl_none_mean"], line={"dash": "dot", "color": "#999"},
                      annotation_text="no features kept", annotation_position="bottom left")
    fig.update_layout(
        title=f"KL vs K — {result['model']} / {result['task']} (N={result['n_prompts']}); labels: effective compression",
        xaxis={"type": "log", "title": "K (occurrences kept per prompt)"},
        yaxis={"title": "KL(clean || circuit), last token"}, plot_bgcolor="white", height=480,
        legend={"orientation": "h", "y": -0.2}, margin={"l": 60, "r": 20, "t": 50, "b": 60})
    return fig


def compression_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows {method, k, kl_mean, effective_compression} for every method point of the sweep."""
    compression = result.get("effective_compression") or {}
    return [{"method": r["method"], "k": r["k"], "kl_mean": r["kl_mean"],
             "effective_compression": (compression.get(r["method"]) or {}).get(str(r["k"]))}
            for r in sorted(result["rows"], key=lambda r: (r["method"], r["k"]))]


def point_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (method, K) point with its metrics: KL and CI, prediction change, faithfulness,
    completeness (None in sweeps made before it was computed), compression, how K was filled."""
    compression = result.get("effective_compression") or {}
    return [{"method": r["method"], "k": r["k"], "kl_mean": r["kl_mean"], "kl_ci95": r.get("kl_ci95"),
             "pred_change_rate": r.get("pred_change_rate"), "faithfulness_mean": r.get("faithfulness_mean"),
             "completeness_mean": r.get("completeness_mean"),
             "effective_compression": (compression.get(r["method"]) or {}).get(str(r["k"])),
             "selection": (r.get("selection") or {}).get("rule", "")}
            for r in sorted(result["rows"], key=lambda r: (r["method"], r["k"]))]


def budget_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The effective-budget rows for a table: method A at K against the base method *run* at
    round(K') and at round(1.5 K), with the paired TOST of each (older sweeps: what they have)."""
    out = []
    for e in result.get("effective_budget") or []:
        k_eq = e.get("k_equivalent")
        bound = e.get("k_equivalent_bound")
        out.append({**e, "k_equivalent": (None if k_eq is None else
                                          (f"≤ {k_eq:.0f}" if bound == "at_most" else f"{k_eq:.1f}")),
                    "equivalent": _yes_no(e.get("equivalent")),
                    "claimed_equivalent": _yes_no(e.get("claimed_equivalent"))})
    return out


def _yes_no(value: bool | None) -> str:
    return "" if value is None else ("yes" if value else "no")
