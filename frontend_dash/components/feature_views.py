"""Views of one feature (DESIGN 7): top-activating examples, logit lens, activation histogram.

Inputs are the API's FeatureDetail JSON pieces: `statistics` ({"histogram": {"edges", "counts"},
"density", "logit_lens": {"top": [[token, value]], "bottom": [...]}}) and `examples` rows
({"tokens", "activations", "max_activation", "quantile"?}). Tokens are text children, shaded by
activation / max activation; nothing is rendered as HTML.

Human example ratings (the FADE "human" rater): an annotation of an explanation with `rating`
0/1/2 and `label` "example:<rank>" rates the example of that rank for that explanation;
`examples_view(..., rateable=True)` puts a 0/1/2 control (id {"type": EXAMPLE_RATING, "rank"})
next to each example.
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from dash import dcc, html

from frontend_dash.components.views import fmt, note, table

NOT_HARVESTED = ("not harvested yet: use \"Harvest, explain and score this feature\" to see examples, "
                 "statistics, explanations and FADE scores")
PROXY_LABEL = ("proxy (offline lexical rater: not a judgement of meaning, not comparable with human or LLM "
               "ratings)")
SPLIT_LABELS = {"explain": "seen by the explainer", "holdout": "held out: only raters see it"}
EXAMPLE_LABEL = "example:"
EXAMPLE_RATING = "example-rating"
RATING_SCALE = ("Rate each held-out example against the chosen explanation: 0 = concept absent, 1 = vague, "
                "2 = clearly present. These ratings are the FADE \"human\" rater (examples the explainer saw "
                "are not rated: scores use held-out texts only).")


def has_statistics(statistics: dict[str, Any] | None) -> bool:
    return bool(statistics) and any(k in statistics for k in ("histogram", "density", "logit_lens"))


def histogram_figure(statistics: dict[str, Any]) -> go.Figure | None:
    """Bar chart of the activation histogram, or None when there is none."""
    hist = (statistics or {}).get("histogram")
    if not hist or not hist.get("counts"):
        return None
    edges, counts = hist["edges"], hist["counts"]
    centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    fig = go.Figure(go.Bar(x=centers, y=counts, width=widths, marker={"color": "#1f77b4"},
                           hovertemplate="activation %{x:.3g}: %{y}<extra></extra>"))
    title = "activation histogram"
    if statistics.get("density") is not None:
        title += f" (density {statistics['density']:.3g})"
    fig.update_layout(title=title, height=260, margin={"l": 40, "r": 10, "t": 40, "b": 40}, plot_bgcolor="white",
                      yaxis={"type": "log", "title": "count"}, xaxis={"title": "activation"}, bargap=0)
    return fig


def shaded_tokens(tokens: list[Any], activations: list[float], top: float) -> list[html.Span]:
    """Token spans with a background whose opacity is activation / top (text, never HTML)."""
    spans = []
    for token, act in zip(tokens, activations):
        alpha = 0.0 if top <= 0 else max(0.0, min(1.0, float(act) / top))
        spans.append(html.Span(str(token), title=f"{float(act):.4g}", className="pie-token",
                               style={"backgroundColor": f"rgba(255,140,0,{alpha:.2f})"}))
    return spans


def example_label(rank: int) -> str:
    """The annotation label tying a human rating to the example of `rank`."""
    return f"{EXAMPLE_LABEL}{int(rank)}"


def example_rank(annotation: dict[str, Any]) -> int | None:
    """The example rank an annotation rates ("example:<rank>" with a rating), else None."""
    label = annotation.get("label") or ""
    rank = label[len(EXAMPLE_LABEL):]
    if annotation.get("rating") is None or not label.startswith(EXAMPLE_LABEL) or not rank.isdigit():
        return None
    return int(rank)


def example_ratings(annotations: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """example rank -> its newest rating annotation (the one FADE uses, and the one to edit)."""
    out: dict[int, dict[str, Any]] = {}
    for a in sorted(annotations, key=lambda a: a["id"]):
        rank = example_rank(a)
        if rank is not None:
            out[rank] = a
    return out


def example_rating_control(rank: int, value: int | None = None) -> dcc.RadioItems:
    """A compact 0/1/2 choice for the example of `rank`."""
    return dcc.RadioItems(id={"type": EXAMPLE_RATING, "rank": int(rank)}, value=value, inline=True,
                          options=[{"label": str(v), "value": v, "title": t}
                                   for v, t in ((0, "0: concept absent"), (1, "1: vague"), (2, "2: clearly present"))],
                          className="pie-example-rating", inputStyle={"marginLeft": "0.3em"},
                          style={"display": "inline-block", "marginRight": "0.8em"})


def examples_view(examples: list[dict[str, Any]], rateable: bool = False) -> html.Div:
    """Top-activating examples, one line each, with max activation and quantile (and, when
    `rateable`, a 0/1/2 rating control keyed by the example's rank)."""
    if not examples:
        return note(NOT_HARVESTED)
    top = max((e.get("max_activation") or 0.0 for e in examples), default=0.0)
    lines = []
    for i, e in enumerate(examples):
        meta = f"max {fmt(e.get('max_activation'))}"
        if e.get("quantile") is not None:
            meta += f" · quantile {fmt(e['quantile'])}"
        if e.get("split") in SPLIT_LABELS:
            meta += f" · {SPLIT_LABELS[e['split']]}"
        parts = [html.Span(meta, className="pie-example-meta"),
                 html.Span(shaded_tokens(e["tokens"], e["activations"], top))]
        rank = int(e.get("rank", i))
        if rateable and e.get("split") != "explain":
            parts.insert(0, example_rating_control(rank))
        lines.append(html.Div(parts, className="pie-example", **{"data-rank": str(rank),
                                                                 "data-split": str(e.get("split") or "")}))
    return html.Div(lines, id="feature-examples")


def logit_lens_view(statistics: dict[str, Any]) -> html.Div:
    """Two small tables: the tokens the decoder row promotes and suppresses most."""
    lens = (statistics or {}).get("logit_lens")
    if not lens:
        return note("no logit lens yet (" + NOT_HARVESTED + ")")
    def rows(pairs: list[list[Any]]) -> list[dict[str, Any]]:
        return [{"token": repr(str(t)), "value": float(v)} for t, v in pairs]
    return html.Div([
        html.Div([html.H4("promotes"), table(rows(lens.get("top", [])), [("token", "token"), ("logit", "value")])],
                 className="pie-col"),
        html.Div([html.H4("suppresses"), table(rows(lens.get("bottom", [])), [("token", "token"), ("logit", "value")])],
                 className="pie-col"),
    ], className="pie-row", id="feature-logit-lens")


def score_summary(scores: list[dict[str, Any]]) -> str:
    """"clarity 0.81 (offline) · purity 0.4 (human)" — the newest score per (metric, rater)."""
    newest = _newest(scores)
    if not newest:
        return "no FADE scores yet"
    return " · ".join(f"{m} {s['value']:.3g}" + (f" ({r})" if r else "") for (m, r), s in sorted(newest.items()))


def _newest(scores: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    newest: dict[tuple[str, str], dict[str, Any]] = {}
    for s in sorted(scores, key=lambda s: (s["created_at"], s["id"])):
        newest[(s["metric"], s["rater"])] = s
    return newest


def _is_proxy(score: dict[str, Any]) -> bool:
    return bool(score.get("proxy", str(score.get("rater", "")).startswith("offline")))


def score_groups(scores: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    """(rater, proxy, "clarity 0.81 · purity 0.4") per rater: human and LLM raters first, proxy
    raters last, so that proxies are never read as one comparison with the others."""
    by_rater: dict[str, list[tuple[str, float]]] = {}
    proxy: dict[str, bool] = {}
    for (metric, rater), s in sorted(_newest(scores).items()):
        by_rater.setdefault(rater, []).append((metric, s["value"]))
        proxy[rater] = _is_proxy(s)
    order = sorted(by_rater, key=lambda r: (proxy[r], r))
    return [(r or "unnamed rater", proxy[r], " · ".join(f"{m} {v:.3g}" for m, v in by_rater[r])) for r in order]


def scores_view(scores: list[dict[str, Any]]) -> html.Div:
    """FADE scores labelled by rater: one line per rater; proxy raters in their own marked block."""
    groups = score_groups(scores)
    if not groups:
        return html.Div("FADE: no scores yet", className="pie-meta pie-scores")
    real = [html.Div(f"FADE by {r}: {line}", className="pie-meta pie-score-line") for r, p, line in groups if not p]
    proxies = [html.Div(f"FADE by {r}, {PROXY_LABEL}: {line}", className="pie-meta pie-score-line pie-score-proxy")
               for r, p, line in groups if p]
    return html.Div(real + proxies, className="pie-scores")
