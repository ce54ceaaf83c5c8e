"""Jobs: launch any kind the worker runs — prune, sweep, explain, score, edges, edge-sweep, hagd —
from a form whose choices come from the API's listings (/api/models, /api/transcoders,
/api/tasks, /api/methods, /api/edge-methods, /api/interpreters), showing each kind's own
fields, then watch live progress bars (polled with dcc.Interval) and follow the link to the
result when a job finishes.

A prune with several methods or budgets launches one job per (method, K), an edges job with
several methods one per method. Explain and score take a stored circuit's id, an explainer and
(score) a rater; "llm" is offered only when configured. Edge and HAGD options are JSON objects
(the method's options; an edge sweep's are per method), checked by the API.
"""

from __future__ import annotations

import json
from typing import Any

import dash
from dash import Input, Output, State, callback, dcc, html, no_update

from frontend_dash.api_client import ApiError, current_client
from frontend_dash.components.job_form import (EDGE_KINDS, INTERP_KINDS, TRANSCODER_KINDS, edge_request,
                                               edge_sweep_request, hagd_request, interp_request, job_requests,
                                               parse_budgets)
from frontend_dash.components.views import error_note, link, note, progress_bar, table


POLL_MS = 500
ACTIVE = ("queued", "running")


KINDS = (("prune", "prune (one circuit per method and K)"), ("sweep", "sweep (KL-vs-K)"),
         ("explain", "explain (a circuit's features)"), ("score", "score (FADE)"),
         ("edges", "edges (one edge circuit per method)"), ("edge-sweep", "edge sweep (faithfulness curves)"),
         ("hagd", "HAGD (hierarchical decomposition)"))
# Which field groups each kind shows.
GROUPS = {"jobs-data-fields": ("prune", "sweep", "edges", "edge-sweep", "hagd"),
          "jobs-transcoder-field": TRANSCODER_KINDS, "jobs-pie-fields": ("prune", "sweep"),
          "jobs-edge-fields": EDGE_KINDS, "jobs-target-field": ("edges",), "jobs-counts-field": ("edge-sweep",),
          "jobs-options-field": ("edges", "edge-sweep", "hagd"), "jobs-interp-fields": INTERP_KINDS}


def result_link(job: dict[str, Any]) -> Any:
    if job.get("circuit_id") is not None:
        return link(f"circuit #{job['circuit_id']}", f"/circuit?id={job['circuit_id']}")
    if job.get("sweep_id") is not None:
        return link(f"sweep #{job['sweep_id']}", f"/sweep?id={job['sweep_id']}")
    if job.get("edge_circuit_id") is not None:
        return link(f"edge circuit #{job['edge_circuit_id']}", f"/edge-circuit?id={job['edge_circuit_id']}")
    if job.get("edge_sweep_id") is not None:
        return link(f"edge sweep #{job['edge_sweep_id']}", f"/edge-sweep?id={job['edge_sweep_id']}")
    if job.get("hierarchy_id") is not None:
        p = job["params"]
        return link(f"hierarchy #{job['hierarchy_id']}", f"/task-overview?model={p.get('model')}&task={p.get('task')}")
    return ""


def _describe(job: dict[str, Any]) -> str:
    p = job["params"]
    if job["kind"] == "prune":
        return f"{p.get('method')} K={p.get('k')} on {p.get('task')} (N={p.get('n')})"
    if job["kind"] == "sweep":
        return f"{', '.join(p.get('methods', []))} K={p.get('ks')} on {p.get('task')} (N={p.get('n')})"
    if job["kind"] == "edges":
        target = f"{p['edges']} edges" if p.get("edges") is not None else f"sparsity {p.get('sparsity')}"
        return f"{p.get('method')} to {target} on {p.get('task')} (N={p.get('n')})"
    if job["kind"] == "edge-sweep":
        return f"{', '.join(p.get('methods', []))} at {p.get('edge_counts') or 'default'} edges on {p.get('task')} (N={p.get('n')})"
    if job["kind"] == "hagd":
        return f"HAGD on {p.get('task')} (N={p.get('n')})"
    if job["kind"] in INTERP_KINDS:
        what = f"feature #{p['feature_id']}" if p.get("feature_id") else f"circuit #{p.get('circuit_id')}"
        if p.get("prompt") is not None:
            what += f", prompt {p['prompt']}"
        who = p.get("explainer", "") + (f", rater {p['rater']}" if job["kind"] == "score" else "")
        return f"{job['kind']} {what} ({who})"
    return f"graph of circuit #{p.get('circuit_id')}"


def job_columns() -> list[tuple[str, Any]]:
    return [("job", lambda j: f"#{j['id']} {j['kind']}"), ("what", _describe), ("status", "status"),
            ("progress", lambda j: progress_bar(j["progress"], j["status"], bar_id=f"job-progress-{j['id']}")),
            ("message", lambda j: j["error"] or j["message"]), ("result", result_link)]


def _options(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"label": r["name"], "value": r["name"]} for r in rows]


# Groups of several fields lay their children out in the form's flex row ("contents").
STYLES = {g: ({"minWidth": "420px"} if g == "jobs-options-field" else
              {} if g in ("jobs-transcoder-field", "jobs-target-field", "jobs-counts-field") else {"display": "contents"})
          for g in GROUPS}


def _style(group_id: str, kind: str) -> dict[str, str]:
    return STYLES[group_id] if kind in GROUPS[group_id] else {"display": "none"}


def _group(group_id: str, children: list[Any], kind: str) -> html.Div:
    return html.Div(children, id=group_id, style=_style(group_id, kind))


def layout(**_query: str) -> html.Div:
    client = current_client()
    try:
        models, tasks, methods = client.models(), client.tasks(), client.methods()
        edge_methods = client.edge_methods()
        transcoders, listing = client.transcoders(), client.interpreters()
        recent = client.jobs(limit=20)["items"]
    except ApiError as err:
        return html.Div([html.H2("Jobs"), error_note(err)])
    with_tc = {t["model"] for t in transcoders}
    model = next((m["name"] for m in models if m["name"] in with_tc), models[0]["name"] if models else None)
    kind = "prune"
    return html.Div([
        dcc.Store(id="jobs-launched", data=[]),
        dcc.Store(id="jobs-transcoders", data=transcoders),
        dcc.Interval(id="jobs-poll", interval=POLL_MS, disabled=True),
        html.H2("Launch a job"),
        html.Div([html.Label("kind"), dcc.RadioItems(id="jobs-kind", value=kind, inline=True,
                                                    options=[{"label": f" {text}", "value": v} for v, text in KINDS])]),
        html.Div([_group("jobs-data-fields", [
            html.Div([html.Label("model"), dcc.Dropdown(id="jobs-model", options=_options(models), value=model,
                                                       clearable=False)]),
            _group("jobs-transcoder-field", [html.Label("transcoder"),
                                             dcc.Dropdown(id="jobs-transcoder", clearable=False)], kind),
            html.Div([html.Label("task"), dcc.Dropdown(id="jobs-task", options=_options(tasks),
                                                      value=tasks[0]["name"] if tasks else None, clearable=False)]),
            html.Div([html.Label("N prompts"), dcc.Input(id="jobs-n", type="number", min=1, value=32)]),
        ], kind),
        _group("jobs-pie-fields", [
            html.Div([html.Label("methods"), dcc.Dropdown(id="jobs-methods", options=_options(methods), multi=True,
                                                         value=[methods[0]["name"]] if methods else [])],
                     style={"minWidth": "320px"}),
            html.Div([html.Label("budgets K"), dcc.Input(id="jobs-ks", type="text", value="50,100,200")]),
        ], kind),
        _group("jobs-edge-fields", [
            html.Div([html.Label("edge methods"), dcc.Dropdown(
                id="jobs-edge-methods", multi=True, value=[edge_methods[0]["name"]] if edge_methods else [],
                options=[{"label": m["name"], "value": m["name"], "title": m["description"]} for m in edge_methods])],
                style={"minWidth": "320px"}),
            _group("jobs-target-field", [html.Label("target: edges or sparsity"),
                                         dcc.Input(id="jobs-edge-target", type="text", value="0.95")], kind),
            _group("jobs-counts-field", [html.Label("edge counts (empty: log-spaced)"),
                                         dcc.Input(id="jobs-edge-counts", type="text", value="")], kind),
        ], kind),
        _group("jobs-options-field", [
            html.Label("options (JSON; edge sweep: per method)"),
            dcc.Textarea(id="jobs-options", value="", placeholder='e.g. {"rho": 0.2}  or  {"eap-ig": {"steps": 3}}',
                         style={"width": "100%", "height": "3em"}),
            html.Div("defaults: " + "; ".join(f"{m['name']} {json.dumps(m['options'])}" for m in edge_methods),
                     className="pie-meta", id="jobs-edge-defaults")], kind),
        _group("jobs-interp-fields", [
            html.Div([html.Label("circuit id (explain, score)"), dcc.Input(id="jobs-circuit", type="number", min=1)]),
            html.Div([html.Label("explainer"), dcc.Dropdown(id="jobs-explainer", clearable=False,
                                                           options=_options(listing["explainers"]),
                                                           value=listing["explainers"][0]["name"])]),
            html.Div([html.Label("rater (score)"), dcc.Dropdown(
                id="jobs-rater", clearable=False, value=listing["raters"][0]["name"],
                options=[{"label": r["name"] + (" (proxy)" if r["proxy"] else ""), "value": r["name"]}
                         for r in listing["raters"]])]),
        ], kind)], className="pie-filters pie-form"),
        html.Button("Launch", id="jobs-submit", n_clicks=0),
        html.Div(id="jobs-form-status"),
        html.H3("Launched here"),
        html.Div(id="jobs-launched-table", children=note("nothing launched yet")),
        html.H3("Recent jobs"),
        table(recent, job_columns(), table_id="jobs-recent", empty="no jobs yet"),
    ])


@callback([Output(g, "style") for g in GROUPS], Input("jobs-kind", "value"))
def show_fields(kind: str):
    """Show the field groups of the chosen kind only."""
    return [_style(g, kind) for g in GROUPS]


@callback(Output("jobs-transcoder", "options"), Output("jobs-transcoder", "value"),
          Input("jobs-model", "value"), State("jobs-transcoders", "data"))
def transcoders_of_model(model: str | None, transcoders: list[dict[str, Any]]):
    names = [t["name"] for t in transcoders if t["model"] == model]
    return [{"label": n, "value": n} for n in names], names[0] if names else None


@callback(Output("jobs-launched", "data"), Output("jobs-form-status", "children"), Output("jobs-poll", "disabled"),
          Input("jobs-submit", "n_clicks"), State("jobs-kind", "value"), State("jobs-model", "value"),
          State("jobs-transcoder", "value"), State("jobs-task", "value"), State("jobs-n", "value"),
          State("jobs-methods", "value"), State("jobs-ks", "value"), State("jobs-launched", "data"),
          State("jobs-circuit", "value"), State("jobs-explainer", "value"), State("jobs-rater", "value"),
          State("jobs-edge-methods", "value"), State("jobs-edge-target", "value"), State("jobs-edge-counts", "value"),
          State("jobs-options", "value"), prevent_initial_call=True)
def launch(n_clicks: int, kind: str, model: str | None, transcoder: str | None, task: str | None, n: int | None,
           methods: list[str] | None, ks: str | None, launched: list[int], circuit: int | None = None,
           explainer: str | None = None, rater: str | None = None, edge_methods: list[str] | None = None,
           target: str | None = None, counts: str | None = None, options: str | None = None):
    if not n_clicks:
        return no_update, no_update, no_update
    if kind in INTERP_KINDS:
        try:
            bodies = [interp_request(kind, circuit, explainer or "offline", rater or "offline")]
        except ValueError as err:
            return no_update, note(str(err), "warning"), no_update
        return _submit(bodies, launched)
    if not (model and task and n) or (kind in TRANSCODER_KINDS and not transcoder):
        return no_update, note("choose a model, " + ("a transcoder, " if kind in TRANSCODER_KINDS else "")
                               + "a task and N", "warning"), no_update
    base = {"model": model, "task": task, "n": int(n)}
    try:
        if kind in EDGE_KINDS:
            if not edge_methods:
                return no_update, note("choose at least one edge method", "warning"), no_update
            bodies = ([edge_request(base, m, target, options) for m in edge_methods] if kind == "edges"
                      else [edge_sweep_request(base, edge_methods, counts, options)])
        elif kind == "hagd":
            bodies = [hagd_request({**base, "transcoder": transcoder}, options)]
        else:
            if not methods:
                return no_update, note("choose at least one method", "warning"), no_update
            bodies = job_requests(kind, {**base, "transcoder": transcoder}, methods, parse_budgets(ks))
    except ValueError as err:
        return no_update, note(str(err), "warning"), no_update
    return _submit(bodies, launched)


def _submit(bodies: list[dict[str, Any]], launched: list[int]):
    client = current_client()
    new_ids, messages = [], []
    for body in bodies:
        try:
            job = client.submit_job(body["kind"], body["params"])
        except ApiError as err:
            messages.append(error_note(err))
            continue
        new_ids.append(job["id"])
        messages.append(note(f"job #{job['id']} " + ("served from the store" if job["reused"] else "queued")))
    return (launched or []) + new_ids, html.Div(messages), not ((launched or []) + new_ids)


@callback(Output("jobs-launched-table", "children"), Output("jobs-poll", "disabled", allow_duplicate=True),
          Input("jobs-poll", "n_intervals"), Input("jobs-launched", "data"), prevent_initial_call=True)
def poll(_n: int | None, launched: list[int]):
    if not launched:
        return note("nothing launched yet"), True
    client = current_client()
    try:
        jobs = [client.job(i) for i in reversed(launched)]
    except ApiError as err:
        return error_note(err), True
    active = any(j["status"] in ACTIVE for j in jobs)
    return table(jobs, job_columns(), table_id="jobs-launched-list"), not active


dash.register_page(__name__, path="/jobs", name="Jobs", title="PIEscope — jobs", layout=layout)
