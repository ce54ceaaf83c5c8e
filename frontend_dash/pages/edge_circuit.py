"""One edge circuit: heads and MLPs by layer with the kept edges, a slider that re-thresholds in
the browser (a clientside callback over the stored edge list), hover with edge scores and each
head's attention summary, and a click on a head showing its attention pattern on each stored
prompt. /edge-circuit?id=<edge circuit id>."""

from __future__ import annotations

import json
from typing import Any

import dash
from dash import Input, Output, State, callback, clientside_callback, dcc, html

from frontend_dash.api_client import ApiError, current_client
from frontend_dash.components.edge_figure import (THRESHOLD_JS, attention_figure, base_figure, clicked_head,
                                                  edge_payload)
from frontend_dash.components.views import error_note, fmt, note, table

TOP_EDGES = 25


def _stat(stat: dict[str, Any] | None) -> str:
    if not stat:
        return "n/a"
    return f"{fmt(stat['mean'])} [{fmt(stat['ci95'][0])}, {fmt(stat['ci95'][1])}]"


def _summary(circuit: dict[str, Any]) -> html.Div:
    result, metrics, cost = circuit["result"], circuit["result"]["metrics"], circuit["result"].get("cost", {})
    lines = [f"{circuit['model']} · {circuit['task']} · N={circuit['n_prompts']} prompts · kept {circuit['n_kept']} "
             f"of {circuit['n_edges']} edges ({100 * circuit['sparsity']:.2f}% sparsity, target {result.get('n_target')})",
             f"KL(full || circuit) {_stat(metrics.get('kl'))} · logit difference recovered "
             f"{_stat(metrics.get('recovered'))} (ratio of means {fmt(metrics.get('recovered_of_means'))}) · "
             f"accuracy {_stat(metrics.get('accuracy'))}",
             f"cost: {fmt(circuit['seconds'])} s, {fmt(cost.get('forwards'))} forwards and {fmt(cost.get('backwards'))} "
             f"backwards per prompt · options {json.dumps(result.get('options', {}), sort_keys=True)}"]
    return html.Div([html.P(line, className="pie-meta") for line in lines])


def layout(id: str | None = None, **_query: str) -> html.Div:  # noqa: A002
    title = html.H2("Edge circuit")
    if id is None or not str(id).isdigit():
        return html.Div([title, note("choose an edge circuit on the Edge circuits page")])
    client = current_client()
    try:
        circuit = client.edge_circuit(int(id))
    except ApiError as err:
        return html.Div([title, error_note(err)])
    try:
        attention = client.edge_attention(circuit["id"], patterns=False)
        attention_note = None
    except ApiError as err:
        if err.status != 404:
            return html.Div([title, error_note(err)])
        attention, attention_note = None, note("no attention patterns stored with this circuit "
                                               "(it was computed before they were kept)")
    result = circuit["result"]
    payload = edge_payload(result)
    base = json.loads(base_figure(result, attention).to_json())
    n = len(payload["x0"])
    return html.Div([
        html.H2(f"Edge circuit #{circuit['id']} — {circuit['method']}"),
        _summary(circuit),
        dcc.Store(id="edge-payload", data=payload),
        dcc.Store(id="edge-base", data=base),
        dcc.Store(id="edge-circuit-id", data=circuit["id"]),
        html.Div([html.Label("edges shown (strongest |score| first)"),
                  dcc.Slider(id="edge-slider", min=0, max=max(n, 1), step=1, value=n, updatemode="drag",
                             marks=None, tooltip={"placement": "bottom", "always_visible": False})],
                 className="pie-edge-slider"),
        html.Div(id="edge-caption", className="pie-meta"),
        dcc.Graph(id="edge-graph", config={"displaylogo": False, "scrollZoom": True}),
        attention_note or "",
        html.H3("Attention of the clicked head"),
        html.Div(note("click a head (a square) to see its attention pattern on each stored prompt"),
                 id="edge-attention"),
        html.H3(f"Strongest kept edges (top {min(TOP_EDGES, n)} of {n})"),
        table(result["kept"][:TOP_EDGES], [("edge", "id"), ("writer", "writer"), ("reader", "reader"), ("score", "score")],
              table_id="edge-top", empty="this circuit kept no edges"),
    ])


clientside_callback(THRESHOLD_JS, Output("edge-graph", "figure"), Output("edge-caption", "children"),
                    Input("edge-slider", "value"), State("edge-payload", "data"), State("edge-base", "data"))


@callback(Output("edge-attention", "children"), Input("edge-graph", "clickData"), State("edge-circuit-id", "data"),
          prevent_initial_call=True)
def show_attention(click: dict[str, Any] | None, circuit_id: int):
    head = clicked_head(click)
    if head is None:
        return dash.no_update
    try:
        data = current_client().edge_attention(circuit_id, head=head)
    except ApiError as err:
        return note(f"{head}: {err.message}", "warning" if err.status == 404 else "error")
    (summary,) = data["heads"]
    graphs = [dcc.Graph(id=f"edge-attention-{p['index']}", figure=attention_figure(summary, p, pattern),
                        config={"displaylogo": False})
              for p, pattern in zip(data["prompts"], summary["patterns"])]
    return html.Div([html.P(f"{head}: attention pattern (clean run) on the first {data['n_prompts']} prompts; rows are "
                            "query positions, columns key positions.", className="pie-meta", id="edge-attention-title"),
                     html.Div(graphs, className="pie-attention-grid")])


dash.register_page(__name__, path="/edge-circuit", name="Edge circuit", title="PIEscope — edge circuit", layout=layout)
