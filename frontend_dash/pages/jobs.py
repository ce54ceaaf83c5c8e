"""Jobs: launch a prune, a sweep, an explain or a score job from a form whose choices come from
the API's listings (/api/models, /api/transcoders, /api/tasks, /api/methods, /api/interpreters),
then watch live progress bars (polled with dcc.Interval) and follow the link to the result when
a job finishes.

A prune with several methods or budgets launches one job per (method, K). Explain and score take
a stored circuit's id, an explainer and (score) a rater; "llm" is offered only when configured.
"""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, State, callback, dcc, html, no_update

from frontend_dash.api_client import ApiError, current_client
from frontend_dash.components.job_form import INTERP_KINDS, interp_request, job_requests, parse_budgets
from frontend_dash.components.views import error_note, link, note, progress_bar, table


POLL_MS = 500
ACTIVE = ("queued", "running")


def result_link(job: dict[str, Any]) -> Any:
    if job.get("circuit_id") is not None:
        return link(f"circuit #{job['circuit_id']}", f"/circuit?id={job['circuit_id']}")
    if job.get("sweep_id") is not None:
        return link(f"sweep #{job['sweep_id']}", f"/sweep?id={job['sweep_id']}")
    return ""


def _describe(job: dict[str, Any]) -> str:
    p = job["params"]
    if job["kind"] == "prune":
        return f"{p.get('method')} K={p.get('k')} on {p.get('task')} (N={p.get('n')})"
    if job["kind"] == "sweep":
        return f"{', '.join(p.get('methods', []))} K={p.get('ks')} on {p.get('task')} (N={p.get('n')})"
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


def layout(**_query: str) -> html.Div:
    client = current_client()
    try:
        models, tasks, methods = client.models(), client.tasks(), client.methods()
        transcoders, listing = client.transcoders(), client.interpreters()
        recent = client.jobs(limit=20)["items"]
    except ApiError as err:
        return html.Div([html.H2("Jobs"), error_note(err)])
    with_tc = {t["model"] for t in transcoders}
    model = next((m["name"] for m in models if m["name"] in with_tc), models[0]["name"] if models else None)
    return html.Div([
        dcc.Store(id="jobs-launched", data=[]),
        dcc.Store(id="jobs-transcoders", data=transcoders),
        dcc.Interval(id="jobs-poll", interval=POLL_MS, disabled=True),
        html.H2("Launch a job"),
        html.Div([
            html.Div([html.Label("kind"), dcc.RadioItems(id="jobs-kind", value="prune", inline=True, options=[
                {"label": " prune (one circuit per method and K)", "value": "prune"},
                {"label": " sweep (KL-vs-K)", "value": "sweep"},
                {"label": " explain (a circuit's features)", "value": "explain"},
                {"label": " score (FADE)", "value": "score"}])]),
            html.Div([html.Label("model"), dcc.Dropdown(id="jobs-model", options=_options(models), value=model,
                                                       clearable=False)]),
            html.Div([html.Label("transcoder"), dcc.Dropdown(id="jobs-transcoder", clearable=False)]),
            html.Div([html.Label("task"), dcc.Dropdown(id="jobs-task", options=_options(tasks),
                                                      value=tasks[0]["name"] if tasks else None, clearable=False)]),
            html.Div([html.Label("N prompts"), dcc.Input(id="jobs-n", type="number", min=1, value=32)]),
            html.Div([html.Label("methods"), dcc.Dropdown(id="jobs-methods", options=_options(methods), multi=True,
                                                         value=[methods[0]["name"]] if methods else [])],
                     style={"minWidth": "320px"}),
            html.Div([html.Label("budgets K"), dcc.Input(id="jobs-ks", type="text", value="50,100,200")]),
        ], className="pie-filters pie-form"),
        html.Div([
            html.Div([html.Label("circuit id (explain, score)"), dcc.Input(id="jobs-circuit", type="number", min=1)]),
            html.Div([html.Label("explainer"), dcc.Dropdown(id="jobs-explainer", clearable=False,
                                                           options=_options(listing["explainers"]),
                                                           value=listing["explainers"][0]["name"])]),
            html.Div([html.Label("rater (score)"), dcc.Dropdown(
                id="jobs-rater", clearable=False, value=listing["raters"][0]["name"],
                options=[{"label": r["name"] + (" (proxy)" if r["proxy"] else ""), "value": r["name"]}
                         for r in listing["raters"]])]),
        ], className="pie-filters pie-form", id="jobs-interp-fields"),
        html.Button("Launch", id="jobs-submit", n_clicks=0),
        html.Div(id="jobs-form-status"),
        html.H3("Launched here"),
        html.Div(id="jobs-launched-table", children=note("nothing launched yet")),
        html.H3("Recent jobs"),
        table(recent, job_columns(), table_id="jobs-recent", empty="no jobs yet"),
    ])


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
          prevent_initial_call=True)
def launch(n_clicks: int, kind: str, model: str | None, transcoder: str | None, task: str | None, n: int | None,
           methods: list[str] | None, ks: str | None, launched: list[int], circuit: int | None = None,
           explainer: str | None = None, rater: str | None = None):
    if not n_clicks:
        return no_update, no_update, no_update
    if kind in INTERP_KINDS:
        try:
            bodies = [interp_request(kind, circuit, explainer or "offline", rater or "offline")]
        except ValueError as err:
            return no_update, note(str(err), "warning"), no_update
        return _submit(bodies, launched)
    if not (model and transcoder and task and methods and n):
        return no_update, note("choose a model, a transcoder, a task, N and at least one method", "warning"), no_update
    try:
        budgets = parse_budgets(ks)
    except ValueError as err:
        return no_update, note(str(err), "warning"), no_update
    base = {"model": model, "transcoder": transcoder, "task": task, "n": int(n)}
    return _submit(job_requests(kind, base, methods, budgets), launched)


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
