"""Circuits: stored circuits and sweeps, filtered by model, task, method and K, with links."""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, callback, dcc, html

from frontend_dash.api_client import ApiError, current_client
from frontend_dash.components.views import error_note, fmt, graphs_label, link, table


PAGE_SIZE = 200


def _options(values: list[str]) -> list[dict[str, str]]:
    return [{"label": v, "value": v} for v in values]


def _filter(label: str, component_id: str, options: list[dict[str, Any]]) -> html.Div:
    return html.Div([html.Label(label), dcc.Dropdown(id=component_id, options=options, clearable=True,
                                                     placeholder="any")])


def layout(**_query: str) -> html.Div:
    client = current_client()
    try:
        models = _options([m["name"] for m in client.models()])
        tasks = _options([t["name"] for t in client.tasks()])
        methods = _options([m["name"] for m in client.methods()])
    except ApiError as err:
        return html.Div([html.H2("Circuits"), error_note(err)])
    return html.Div([
        html.H2("Circuits"),
        html.Div([_filter("model", "circuits-model", models), _filter("task", "circuits-task", tasks),
                  _filter("method", "circuits-method", methods),
                  html.Div([html.Label("K"), dcc.Input(id="circuits-k", type="number", min=1, debounce=True,
                                                      placeholder="any")])], className="pie-filters"),
        html.Div(id="circuits-table"),
        html.H2("Sweeps (KL-vs-K)"),
        html.Div(id="sweeps-table"),
    ])


def circuit_columns() -> list[tuple[str, Any]]:
    return [("id", lambda r: link(f"#{r['id']}", f"/circuit?id={r['id']}")), ("model", "model"), ("task", "task"),
            ("method", "method"), ("K", "k"), ("budget", "budget"), ("N", "n_prompts"),
            ("KL mean", "kl_mean"), ("KL 95% CI", "kl_ci95"), ("pred. changed", "pred_change_rate"),
            ("faithfulness", "faithfulness_mean"), ("graphs", lambda r: graphs_label(r["graph_keys"])),
            ("compare", lambda r: link("compare…", f"/compare?a={r['id']}"))]


def sweep_columns() -> list[tuple[str, Any]]:
    return [("id", lambda r: link(f"sweep #{r['id']}", f"/sweep?id={r['id']}")), ("model", "model"),
            ("task", "task"), ("methods", lambda r: ", ".join(r["methods"])), ("K", lambda r: fmt(r["ks"])),
            ("N", "n_prompts"), ("active occurrences", "n_active_mean"), ("KL none kept", "kl_none_mean")]


@callback(Output("circuits-table", "children"), Output("sweeps-table", "children"),
          Input("circuits-model", "value"), Input("circuits-task", "value"), Input("circuits-method", "value"),
          Input("circuits-k", "value"))
def update_tables(model: str | None, task: str | None, method: str | None, k: int | None):
    client = current_client()
    try:
        circuits = client.circuits(model=model, task=task, method=method, k=k, limit=PAGE_SIZE)
        sweeps = client.sweeps(model=model, task=task, limit=PAGE_SIZE)
    except ApiError as err:
        return error_note(err), ""
    sweep_rows = [s for s in sweeps["items"] if (not method or method in s["methods"]) and (not k or k in s["ks"])]
    return (html.Div([html.P(f"{circuits['total']} circuit(s)", className="pie-meta"),
                      table(circuits["items"], circuit_columns(), table_id="circuits-list",
                            empty="no circuits match (launch one from Jobs)")]),
            table(sweep_rows, sweep_columns(), table_id="sweeps-list", empty="no sweeps match"))


dash.register_page(__name__, path="/", name="Circuits", title="PIEscope — circuits", layout=layout)
