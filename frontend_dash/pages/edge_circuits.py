"""Edge circuits: stored edge circuits (EAP, EAP-IG, ACDC, Edge Pruning, HAP) and edge sweeps,
filtered by model, task and method, with links to each circuit and sweep."""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, callback, dcc, html

from frontend_dash.api_client import ApiError, current_client
from frontend_dash.components.views import error_note, fmt, link, table

PAGE_SIZE = 200


def _filter(label: str, component_id: str, values: list[str]) -> html.Div:
    return html.Div([html.Label(label), dcc.Dropdown(id=component_id, options=[{"label": v, "value": v} for v in values],
                                                     clearable=True, placeholder="any")])


def layout(**_query: str) -> html.Div:
    client = current_client()
    try:
        models = [m["name"] for m in client.models()]
        tasks = [t["name"] for t in client.tasks()]
        methods = [m["name"] for m in client.edge_methods()]
    except ApiError as err:
        return html.Div([html.H2("Edge circuits"), error_note(err)])
    return html.Div([
        html.H2("Edge circuits"),
        html.P("Circuits over attention heads and MLPs: which writer -> reader edges a method keeps.",
               className="pie-meta"),
        html.Div([_filter("model", "edge-circuits-model", models), _filter("task", "edge-circuits-task", tasks),
                  _filter("method", "edge-circuits-method", methods)], className="pie-filters"),
        html.Div(id="edge-circuits-table"),
        html.H2("Edge sweeps (faithfulness curves)"),
        html.Div(id="edge-sweeps-table"),
    ])


def circuit_columns() -> list[tuple[str, Any]]:
    return [("id", lambda r: link(f"#{r['id']}", f"/edge-circuit?id={r['id']}")), ("model", "model"),
            ("task", "task"), ("method", "method"), ("N", "n_prompts"), ("edges kept", "n_kept"),
            ("of", "n_edges"), ("sparsity", lambda r: f"{100 * r['sparsity']:.2f}%"), ("KL mean", "kl_mean"),
            ("KL 95% CI", "kl_ci95"), ("logit diff. recovered", "recovered"), ("seconds", "seconds")]


def sweep_columns() -> list[tuple[str, Any]]:
    return [("id", lambda r: link(f"edge sweep #{r['id']}", f"/edge-sweep?id={r['id']}")), ("model", "model"),
            ("task", "task"), ("methods", lambda r: ", ".join(r["methods"])), ("edge counts", lambda r: fmt(r["counts"])),
            ("N", "n_prompts"), ("graph edges", "n_edges"), ("seconds", "seconds")]


@callback(Output("edge-circuits-table", "children"), Output("edge-sweeps-table", "children"),
          Input("edge-circuits-model", "value"), Input("edge-circuits-task", "value"),
          Input("edge-circuits-method", "value"))
def update_tables(model: str | None, task: str | None, method: str | None):
    client = current_client()
    try:
        circuits = client.edge_circuits(model=model, task=task, method=method, limit=PAGE_SIZE)
        sweeps = client.edge_sweeps(model=model, task=task, limit=PAGE_SIZE)
    except ApiError as err:
        return error_note(err), ""
    sweep_rows = [s for s in sweeps["items"] if not method or method in s["methods"]]
    return (html.Div([html.P(f"{circuits['total']} edge circuit(s)", className="pie-meta"),
                      table(circuits["items"], circuit_columns(), table_id="edge-circuits-list",
                            empty="no edge circuits match (launch an edges job from Jobs)")]),
            table(sweep_rows, sweep_columns(), table_id="edge-sweeps-list", empty="no edge sweeps match"))


dash.register_page(__name__, path="/edge-circuits", name="Edge circuits", title="PIEscope — edge circuits",
                   layout=layout)
