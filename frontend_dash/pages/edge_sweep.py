"""Faithfulness curves of an edge sweep: KL and logit difference recovered against edges kept
(log axis), bootstrap 95% CI bands, one line per method with its time in the legend.
/edge-sweep?id=<edge sweep id> (newest by default)."""

from __future__ import annotations

import dash
from dash import Input, Output, callback, dcc, html

from frontend_dash.api_client import ApiError, current_client
from frontend_dash.components.curves_figure import edge_sweep_figure, sweep_rows
from frontend_dash.components.views import error_note, fmt, note, table

TITLE = "Edge sweep: faithfulness curves"


def layout(id: str | None = None, **_query: str) -> html.Div:  # noqa: A002
    try:
        sweeps = current_client().edge_sweeps(limit=500)["items"]
    except ApiError as err:
        return html.Div([html.H2(TITLE), error_note(err)])
    if not sweeps:
        return html.Div([html.H2(TITLE), note("no edge sweeps stored yet: launch an edge-sweep job from Jobs")])
    options = [{"label": f"#{s['id']} {s['model']} / {s['task']}: {', '.join(s['methods'])} (N={s['n_prompts']})",
                "value": s["id"]} for s in sweeps]
    chosen = int(id) if id is not None and str(id).isdigit() else sweeps[0]["id"]
    return html.Div([html.H2(TITLE), dcc.Dropdown(id="edge-sweep-select", options=options, value=chosen,
                                                  clearable=False),
                     html.Div(id="edge-sweep-body")])


@callback(Output("edge-sweep-body", "children"), Input("edge-sweep-select", "value"))
def show_sweep(sweep_id: int):
    try:
        sweep = current_client().edge_sweep(sweep_id)
    except ApiError as err:
        return error_note(err)
    result = sweep["result"]
    area = result.get("area") or {}
    return html.Div([
        dcc.Graph(id="edge-sweep-figure", figure=edge_sweep_figure(result), config={"displaylogo": False}),
        html.P(f"{sweep['n_edges']} edges in the graph · total {fmt(sweep['seconds'])} s · area under each curve "
               "over log edge counts (normalised): " + "; ".join(
                   f"{m}: KL {fmt(a.get('kl'))}, recovered {fmt(a.get('recovered'))}" for m, a in area.items()),
               className="pie-meta"),
        table(sweep_rows(result), [("method", "method"), ("target", "n_target"), ("edges kept", "n_kept"),
                                   ("KL", "kl"), ("KL 95% CI", "kl_ci95"), ("recovered", "recovered"),
                                   ("recovered 95% CI", "recovered_ci95"), ("ratio of means", "recovered_of_means"),
                                   ("accuracy", "accuracy"), ("seconds", "seconds"), ("forwards / prompt", "forwards")],
              table_id="edge-sweep-rows"),
    ])


dash.register_page(__name__, path="/edge-sweep", name="Edge sweep", title="PIEscope — edge sweep", layout=layout)
