"""Compare: two circuits side by side (two methods, or two budgets) — shared and unique features,
per-prompt KL difference, and the two aggregate graphs. /compare?a=<id>&b=<id>."""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, callback, dcc, html

from frontend_dash.api_client import ApiError, current_client
from frontend_dash.components.compare import feature_sets, jaccard, kl_difference_figure, label
from frontend_dash.components.graph_figure import aggregate_figure, stored_graphs
from frontend_dash.components.views import error_note, fmt, link, note, table



def layout(a: str | None = None, b: str | None = None, **_query: str) -> html.Div:
    try:
        circuits = current_client().circuits(limit=500)["items"]
    except ApiError as err:
        return html.Div([html.H2("Compare circuits"), error_note(err)])
    if not circuits:
        return html.Div([html.H2("Compare circuits"), note("no circuits stored yet: launch one from Jobs")])
    options = [{"label": label(c), "value": c["id"]} for c in circuits]
    ids = [c["id"] for c in circuits]
    first = int(a) if a and a.isdigit() else ids[0]
    second = int(b) if b and b.isdigit() else next((i for i in ids if i != first), first)
    return html.Div([
        html.H2("Compare circuits"),
        html.Div([html.Div([html.Label("A"), dcc.Dropdown(id="compare-a", options=options, value=first,
                                                         clearable=False)]),
                  html.Div([html.Label("B"), dcc.Dropdown(id="compare-b", options=options, value=second,
                                                         clearable=False)])], className="pie-filters"),
        html.Div(id="compare-body"),
    ])


def _feature_cell(row: dict[str, Any]) -> str:
    return f"L{row['layer']} #{row['feature']}"


def _graph_column(circuit: dict[str, Any]) -> html.Div:
    _, aggregate = stored_graphs(circuit)
    body: Any = (note("no graph computed yet") if aggregate is None else
                 dcc.Graph(figure=aggregate_figure(aggregate, threshold=0.1, title=label(circuit)),
                           config={"displaylogo": False}))
    return html.Div([html.H4(link(label(circuit), f"/circuit?id={circuit['id']}")), body], className="pie-col")


@callback(Output("compare-body", "children"), Input("compare-a", "value"), Input("compare-b", "value"))
def compare(a_id: int, b_id: int):
    client = current_client()
    try:
        a, b = client.circuit(a_id, fresh=True), client.circuit(b_id, fresh=True)
    except ApiError as err:
        return error_note(err)
    sets = feature_sets(a, b)
    columns = [("feature", _feature_cell), ("prompts in A", "n_prompts_a"),
               ("prompts in B", "n_prompts_b")]
    warning = [] if a["transcoder"] == b["transcoder"] else [
        note(f"different transcoders ({a['transcoder']} vs {b['transcoder']}): feature ids are not comparable",
             "warning")]
    return html.Div(warning + [
        html.P(f"{len(sets['shared'])} shared, {len(sets['only_a'])} only in A, {len(sets['only_b'])} only in B "
               f"(Jaccard {fmt(jaccard(sets))}) · KL mean A {fmt(a['kl_mean'])}, B {fmt(b['kl_mean'])}",
               id="compare-summary"),
        html.Div([html.Div([html.H4("shared"), table(sets["shared"], columns, table_id="compare-shared")],
                           className="pie-col"),
                  html.Div([html.H4("only in A"), table(sets["only_a"], columns)], className="pie-col"),
                  html.Div([html.H4("only in B"), table(sets["only_b"], columns)], className="pie-col")],
                 className="pie-row"),
        dcc.Graph(id="compare-kl", figure=kl_difference_figure(a, b), config={"displaylogo": False}),
        html.Div([_graph_column(a), _graph_column(b)], className="pie-row"),
    ])


dash.register_page(__name__, path="/compare", name="Compare", title="PIEscope — compare circuits", layout=layout)
