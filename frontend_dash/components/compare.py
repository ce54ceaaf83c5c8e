"""Comparing two circuits (two methods, or two budgets), pure functions of CircuitDetail JSON.

Features are (layer, feature) pairs of each circuit's aggregated `features` list; per-prompt KL
is each prompt's `kl_last`, matched by prompt index (prompts the two circuits do not share are
left out).
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go


def label(circuit: dict[str, Any]) -> str:
    """"#3 fap K=100 (ioi)"."""
    return f"#{circuit['id']} {circuit['method']} K={circuit['k']} ({circuit['task']})"


def feature_sets(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """{"shared", "only_a", "only_b"}: rows {layer, feature, n_prompts_a, n_prompts_b}, by layer."""
    fa = {(f["layer"], f["feature"]): f for f in a["features"]}
    fb = {(f["layer"], f["feature"]): f for f in b["features"]}

    def rows(keys: set[tuple[int, int]]) -> list[dict[str, Any]]:
        return [{"layer": l, "feature": f, "n_prompts_a": fa[(l, f)]["n_prompts"] if (l, f) in fa else 0,
                 "n_prompts_b": fb[(l, f)]["n_prompts"] if (l, f) in fb else 0} for l, f in sorted(keys)]
    return {"shared": rows(fa.keys() & fb.keys()), "only_a": rows(fa.keys() - fb.keys()),
            "only_b": rows(fb.keys() - fa.keys())}


def jaccard(sets: dict[str, list[dict[str, Any]]]) -> float:
    """|shared| / |union| of the two feature sets (0 when both are empty)."""
    union = len(sets["shared"]) + len(sets["only_a"]) + len(sets["only_b"])
    return len(sets["shared"]) / union if union else 0.0


def kl_pairs(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows {prompt, kl_a, kl_b, diff = kl_b - kl_a} over the prompts both circuits have (and measured:
    an imported graph's circuit has no KL)."""
    kb = {p["index"]: p["kl_last"] for p in b["prompts"] if p.get("kl_last") is not None}
    return [{"prompt": p["index"], "kl_a": p["kl_last"], "kl_b": kb[p["index"]], "diff": kb[p["index"]] - p["kl_last"]}
            for p in sorted(a["prompts"], key=lambda p: p["index"]) if p["index"] in kb and p.get("kl_last") is not None]


def kl_difference_figure(a: dict[str, Any], b: dict[str, Any]) -> go.Figure:
    """Per-prompt KL(B) - KL(A): below zero, B keeps the behaviour better on that prompt."""
    rows = kl_pairs(a, b)
    fig = go.Figure(go.Bar(x=[r["prompt"] for r in rows], y=[r["diff"] for r in rows],
                           marker={"color": ["#2ca02c" if r["diff"] < 0 else "#d62728" for r in rows]},
                           customdata=[[r["kl_a"], r["kl_b"]] for r in rows],
                           hovertemplate="prompt %{x}<br>KL A %{customdata[0]:.4g}<br>KL B %{customdata[1]:.4g}"
                                         "<br>B - A %{y:.4g}<extra></extra>"))
    fig.update_layout(title=f"per-prompt KL: B ({label(b)}) minus A ({label(a)})", height=320,
                      xaxis={"title": "prompt", "type": "category"}, yaxis={"title": "KL B - KL A"},
                      plot_bgcolor="white", margin={"l": 60, "r": 20, "t": 50, "b": 40})
    return fig
