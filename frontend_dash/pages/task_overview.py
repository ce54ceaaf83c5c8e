"""Task overview: for one model and task, every stored method's curve on one figure — feature
methods (PIE, HAGD) against features kept and edge methods against edges kept, on two subplots
that never share an axis — with each method's cost. /task-overview?model=<m>&task=<t>."""

from __future__ import annotations

import dash
from dash import Input, Output, callback, dcc, html

from frontend_dash.api_client import ApiError, current_client
from frontend_dash.components.curves_figure import METRICS, overview_figure, overview_rows
from frontend_dash.components.views import error_note, note, table

TITLE = "Task overview: every method on one task"


def _default_pair(client) -> tuple[str | None, str | None]:
    """The model and task of the newest stored result (a sweep, an edge sweep, or a circuit)."""
    for listing in (client.sweeps, client.edge_sweeps, client.circuits, client.edge_circuits):
        items = listing(limit=1)["items"]
        if items:
            return items[0]["model"], items[0]["task"]
    return None, None


def layout(model: str | None = None, task: str | None = None, **_query: str) -> html.Div:
    client = current_client()
    try:
        models = [m["name"] for m in client.models()]
        tasks = [t["name"] for t in client.tasks()]
        newest = _default_pair(client) if not (model and task) else (model, task)
    except ApiError as err:
        return html.Div([html.H2(TITLE), error_note(err)])
    model, task = model or newest[0], task or newest[1]
    models += [model] if model and model not in models else []
    return html.Div([
        html.H2(TITLE),
        html.Div([
            html.Div([html.Label("model"), dcc.Dropdown(id="overview-model", value=model, clearable=False,
                                                       options=[{"label": m, "value": m} for m in models])]),
            html.Div([html.Label("task"), dcc.Dropdown(id="overview-task", value=task or (tasks[0] if tasks else None),
                                                      clearable=False, options=[{"label": t, "value": t} for t in tasks])]),
            html.Div([html.Label("y axis"), dcc.RadioItems(id="overview-metric", value="recovered", inline=True,
                                                          options=[{"label": f" {v}", "value": k}
                                                                   for k, v in METRICS.items()])]),
        ], className="pie-filters"),
        html.Div(id="overview-body"),
    ])


@callback(Output("overview-body", "children"), Input("overview-model", "value"), Input("overview-task", "value"),
          Input("overview-metric", "value"))
def show_overview(model: str | None, task: str | None, metric: str):
    if not (model and task):
        return note("choose a model and a task")
    try:
        overview = current_client().task_overview(model, task)
    except ApiError as err:
        return error_note(err)
    if not overview["curves"]:
        return note(f"nothing stored for {model} on {task} yet: launch sweeps, edge sweeps or HAGD from Jobs")
    return html.Div([
        dcc.Graph(id="overview-figure", figure=overview_figure(overview, metric or "recovered"),
                  config={"displaylogo": False}),
        html.P("Recovered: PIE's faithfulness (M_circuit − M_none) / (M_clean − M_none), the edge methods' logit "
               "difference recovered, HAGD's sufficiency; each the mean of per-prompt (per-seed) ratios. PIE's K "
               "counts occurrences kept per prompt, HAGD's x the features of its circuit. HAGD has no KL.",
               className="pie-meta"),
        table(overview_rows(overview), [("family", "family"), ("method", "method"), ("from", "source"),
                                        ("x", "x_unit"), ("points", "points"), ("recovered is", "metric"),
                                        ("band", "band"), ("seconds", "seconds")], table_id="overview-cost"),
    ])


dash.register_page(__name__, path="/task-overview", name="Task overview", title="PIEscope — task overview",
                   layout=layout)
