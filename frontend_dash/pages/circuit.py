"""Circuit: the attribution graph of a stored circuit, per prompt or aggregated over prompts.

/circuit?id=<circuit id>[&prompt=<index>]. Kept occurrences by layer (rows) and token position
(columns); edges filtered by a relative-weight threshold; hovering shows a feature's current
explanation; clicking a feature opens its panel. When the selected view has no stored graph, a
button POSTs a `graph` job and the page polls it until the graph can be drawn. The Neuronpedia
JSON export is served by the dashboard's /export route. "Explain and score this circuit" runs an
explain job and then a score job (explainer and rater from what the worker offers) on the
features of the prompt in view, or all of the circuit's, with live progress; the graph's hover
texts and the feature panel (examples, explanation, scores by rater) then fill in.
"""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, State, callback, dcc, html, no_update

from frontend_dash.api_client import ApiError, current_client
from frontend_dash.components.graph_figure import (aggregate_figure, clicked_feature, feature_key, graph_figure,
                                                   stored_graphs)
from frontend_dash.components.feature_views import scores_view
from frontend_dash.components.interp_launch import interp_controls, launch, poll
from frontend_dash.components.views import error_note, fmt, link, note, progress_bar


AGGREGATE = "aggregate"
POLL_MS = 500
DEFAULT_THRESHOLD = 0.05


def _prompt_options(circuit: dict[str, Any]) -> list[dict[str, Any]]:
    per_prompt, _ = stored_graphs(circuit)
    options = [{"label": "aggregate over prompts", "value": AGGREGATE}]
    for p in circuit["prompts"]:
        mark = "" if p["index"] in per_prompt else " (no graph yet)"
        text = p["clean"] if len(p["clean"]) <= 70 else p["clean"][:69] + "…"
        options.append({"label": f"prompt {p['index']}{mark}: {text}", "value": str(p["index"])})
    return options


def _default_view(circuit: dict[str, Any], requested: str | None) -> str:
    per_prompt, aggregate = stored_graphs(circuit)
    if requested is not None and requested.isdigit():
        return requested
    if aggregate is not None or not per_prompt:
        return AGGREGATE
    return str(min(per_prompt))


def summary(circuit: dict[str, Any]) -> html.Div:
    """The circuit's identity and metrics as a line of text."""
    low, high = circuit["kl_ci95"]
    if circuit["method"] == "imported":
        return html.Div([html.P(f"{circuit['model']} · {circuit['transcoder']} · an attribution graph imported from "
                                f"a file ({circuit['k']} feature nodes)"),
                         html.P("nothing was measured on it (no KL, prediction change or faithfulness)",
                                className="pie-meta")])
    return html.Div([
        html.P(f"{circuit['model']} · {circuit['transcoder']} · task {circuit['task']} · {circuit['method']} "
               f"K={circuit['k']} ({circuit['budget']}) · N={circuit['n_prompts']}"),
        html.P(f"KL {fmt(circuit['kl_mean'])} (95% CI {fmt(low)}–{fmt(high)}) · prediction changed "
               f"{fmt(circuit['pred_change_rate'])} · faithfulness {fmt(circuit['faithfulness_mean'])}",
               className="pie-meta"),
    ])


def layout(id: str | None = None, prompt: str | None = None, **_query: str) -> html.Div:  # noqa: A002
    if id is None or not str(id).isdigit():
        return html.Div([html.H2("Circuit"), note("pick a circuit on the Circuits page"), link("Circuits", "/")])
    try:
        circuit = current_client().circuit(int(id), fresh=True)
        listing = current_client().interpreters()
    except ApiError as err:
        return html.Div([html.H2("Circuit"), error_note(err)])
    view = _default_view(circuit, prompt)
    first = render_view(circuit["id"], view, DEFAULT_THRESHOLD, [])
    return html.Div([
        dcc.Store(id="circuit-id", data=circuit["id"]),
        dcc.Store(id="circuit-version", data=0),
        dcc.Store(id="circuit-job"),
        dcc.Interval(id="circuit-poll", interval=POLL_MS, disabled=True),
        html.H2(f"Circuit #{circuit['id']}"),
        summary(circuit),
        html.Div([
            html.Div([html.Label("view"), dcc.Dropdown(id="circuit-prompt", options=_prompt_options(circuit),
                                                      value=view, clearable=False)],
                     style={"flex": "2 1 420px"}),
            html.Div([html.Label("edge threshold (fraction of the largest |weight|)"),
                      dcc.Slider(id="circuit-threshold", min=0, max=1, step=0.05, value=DEFAULT_THRESHOLD,
                                 marks={0: "0", 0.25: "0.25", 0.5: "0.5", 0.75: "0.75", 1: "1"})],
                     style={"flex": "2 1 320px"}),
            html.Div([dcc.Checklist(id="circuit-errors", options=[{"label": " error, pruned, bias", "value": "show"}],
                                    value=[])], style={"flex": "0 0 140px", "paddingTop": "1.6em"}),
        ], className="pie-filters"),
        html.Div([
            html.Button("Compute graph", id="circuit-compute", n_clicks=0, style=first[3]),
            html.A("Neuronpedia JSON", id="circuit-export", href=first[4], target="_blank", style=first[5]),
            html.Span(" · "), link("compare with…", f"/compare?a={circuit['id']}"),
        ]),
        html.Div(id="circuit-job-status"),
        html.Details([html.Summary("Explain and score this circuit"), interp_controls(
            "circuit-interp", listing, "Explain and score this circuit",
            extra=[html.Div([html.Label("features"), dcc.RadioItems(id="circuit-interp-scope", value="prompt", options=[
                {"label": " those of the prompt in view", "value": "prompt"},
                {"label": " all the circuit's", "value": "all"}])])])], open=True, id="circuit-interp"),
        html.Div(first[2], id="circuit-graph-note"),
        html.Div([
            html.Div(dcc.Graph(id="circuit-graph", config={"displaylogo": False, "scrollZoom": True},
                               **({} if first[0] is no_update else {"figure": first[0]}), style=first[1]),
                     style={"flex": "3 1 640px"}),
            html.Div(note("click a feature node to see it here"), id="circuit-feature-panel", className="pie-panel",
                     style={"flex": "1 1 300px"}),
        ], className="pie-row"),
    ])


def _explanations(circuit: dict[str, Any], nodes: list[dict[str, Any]]) -> dict[str, str]:
    keys = [(n["layer"], n["feature"]) for n in nodes if n["kind"] == "feature"]
    if not keys:
        return {}
    found = current_client().explanations_by_feature(circuit["transcoder"], keys)
    return {feature_key(l, f): row["text"] for (l, f), row in found.items()}


@callback(Output("circuit-graph", "figure"), Output("circuit-graph", "style"), Output("circuit-graph-note", "children"),
          Output("circuit-compute", "style"), Output("circuit-export", "href"), Output("circuit-export", "style"),
          Input("circuit-prompt", "value"), Input("circuit-threshold", "value"), Input("circuit-errors", "value"),
          Input("circuit-version", "data"), State("circuit-id", "data"), prevent_initial_call=True)
def render_graph(view: str, threshold: float, errors: list[str], _version: int, circuit_id: int):
    """Redraw on a new view, threshold, error toggle or freshly computed graph."""
    return render_view(circuit_id, view, threshold, errors)


def render_view(circuit_id: int, view: str, threshold: float, errors: list[str] | None) -> tuple:
    """(figure, graph style, note, compute-button style, export href, export style) of a view;
    the layout draws the first view with it, the callback every later one."""
    hidden, shown = {"display": "none"}, {}
    try:
        circuit = current_client().circuit(circuit_id)
        per_prompt, aggregate = stored_graphs(circuit)
        if view == AGGREGATE:
            if aggregate is None:
                return (no_update, hidden, note("no graph computed yet for this circuit: compute it (all prompts)"),
                        shown, "", hidden)
            figure = aggregate_figure(aggregate, explanations=_explanations(circuit, aggregate["nodes"]),
                                      threshold=threshold or 0.0, title="features across prompts")
            first = min(per_prompt) if per_prompt else None
            href = "" if first is None else f"/export/circuit/{circuit_id}/{per_prompt[first][0]}.json?prompt={first}"
            return figure, shown, "", hidden, href, shown if href else hidden
        index = int(view)
        if index not in per_prompt:
            return no_update, hidden, note(f"no graph computed yet for prompt {index}: compute it"), shown, "", hidden
        key, graph = per_prompt[index]
        figure = graph_figure(graph, explanations=_explanations(circuit, graph["nodes"]), threshold=threshold or 0.0,
                              show_errors="show" in (errors or []), title=f"prompt {index}")
        return figure, shown, "", hidden, f"/export/circuit/{circuit_id}/{key}.json?prompt={index}", shown
    except ApiError as err:
        return no_update, hidden, error_note(err), hidden, "", hidden


@callback(Output("circuit-job", "data"), Output("circuit-poll", "disabled"), Output("circuit-job-status", "children"),
          Input("circuit-compute", "n_clicks"), State("circuit-prompt", "value"), State("circuit-id", "data"),
          prevent_initial_call=True)
def compute_graph(n_clicks: int, view: str, circuit_id: int):
    if not n_clicks:
        return no_update, no_update, no_update
    params = {"circuit_id": circuit_id, "prompt": None if view == AGGREGATE else int(view)}
    try:
        job = current_client().submit_job("graph", params)
    except ApiError as err:
        return None, True, error_note(err)
    return job["id"], False, _job_line(job)


def _job_line(job: dict[str, Any]) -> html.Div:
    return html.Div([html.Span(f"graph job #{job['id']}: {job['status']} {job['message']} "),
                     progress_bar(job["progress"], job["status"], bar_id="circuit-job-progress")],
                    className="pie-row")


@callback(Output("circuit-job-status", "children", allow_duplicate=True), Output("circuit-poll", "disabled",
                                                                                  allow_duplicate=True),
          Output("circuit-version", "data"), Output("circuit-prompt", "options"),
          Input("circuit-poll", "n_intervals"), State("circuit-job", "data"), State("circuit-id", "data"),
          State("circuit-version", "data"), prevent_initial_call=True)
def poll_graph_job(_n: int, job_id: int | None, circuit_id: int, version: int):
    if job_id is None:
        return no_update, True, no_update, no_update
    client = current_client()
    try:
        job = client.job(job_id)
        if job["status"] in ("queued", "running"):
            return _job_line(job), False, no_update, no_update
        if job["status"] != "done":
            return error_note(ApiError(0, f"graph job #{job_id} {job['status']}: {job['error'] or job['message']}")), \
                True, no_update, no_update
        circuit = client.circuit(circuit_id, fresh=True)
    except ApiError as err:
        return error_note(err), True, no_update, no_update
    return _job_line(job), True, (version or 0) + 1, _prompt_options(circuit)


@callback(Output("circuit-interp-chain", "data"), Output("circuit-interp-poll", "disabled"),
          Output("circuit-interp-status", "children"), Input("circuit-interp-launch", "n_clicks"),
          State("circuit-interp-explainer", "value"), State("circuit-interp-rater", "value"),
          State("circuit-interp-corpus", "value"), State("circuit-interp-scope", "value"),
          State("circuit-prompt", "value"), State("circuit-id", "data"), prevent_initial_call=True)
def launch_interpretation(n_clicks: int, explainer: str, rater: str, corpus: str, scope: str, view: str,
                          circuit_id: int):
    if not n_clicks:
        return no_update, no_update, no_update
    target: dict[str, Any] = {"circuit_id": circuit_id}
    if scope == "prompt" and view != AGGREGATE:
        target["prompt"] = int(view)
    return launch(current_client(), target, explainer, rater, corpus)


@callback(Output("circuit-interp-chain", "data", allow_duplicate=True),
          Output("circuit-interp-poll", "disabled", allow_duplicate=True),
          Output("circuit-interp-status", "children", allow_duplicate=True),
          Output("circuit-version", "data", allow_duplicate=True),
          Input("circuit-interp-poll", "n_intervals"), State("circuit-interp-chain", "data"),
          State("circuit-version", "data"), prevent_initial_call=True)
def poll_interpretation(_n: int, state: dict[str, Any] | None, version: int):
    return poll(current_client(), state, "circuit-interp", version)


@callback(Output("circuit-feature-panel", "children"), Input("circuit-graph", "clickData"),
          Input("circuit-version", "data"), State("circuit-id", "data"), prevent_initial_call=True)
def show_feature(click_data: dict[str, Any] | None, _version: int, circuit_id: int):
    picked = clicked_feature(click_data)
    if picked is None:
        return no_update
    layer, index = picked
    client = current_client()
    try:
        circuit = client.circuit(circuit_id)
        feature = client.lookup_feature(circuit["transcoder"], layer, index)
        scores = {e["id"]: client.scores(e["id"]) for e in feature["explanations"]}
    except ApiError as err:
        if err.status == 404:  # a node of a feature never harvested nor explained has no row yet
            return note(f"feature L{layer} #{index}: nothing stored yet — explain and score this circuit")
        return error_note(err)
    return feature_panel(feature, scores)


def feature_panel(feature: dict[str, Any], scores: dict[int, list[dict[str, Any]]] | None = None) -> html.Div:
    """A feature's explanations (as text) with their FADE scores by rater, and a link to its page."""
    explanations = sorted(feature["explanations"], key=lambda e: e["updated_at"], reverse=True)
    items = [html.Div([html.Div(e["text"], className="pie-explanation-text"),
                       html.Div(f"{e['source']}" + (f" · {e['author']}" if e["author"] else "")
                                + f" · revision {e['revision']}", className="pie-meta"),
                       scores_view((scores or {}).get(e["id"], []))],
                      className="pie-explanation") for e in explanations]
    stats = feature.get("statistics") or {}
    n_examples = len(feature.get("examples") or [])
    return html.Div([
        html.H3(f"Feature L{feature['layer']} #{feature['index']}", id="circuit-feature-title"),
        html.P(f"{feature['transcoder']}" + (f" · density {fmt(stats['density'])}" if "density" in stats else "")
               + f" · {n_examples} examples", className="pie-meta"),
        html.Div(items or [note("no explanation yet")]),
        link("open feature page (examples, annotate) →", f"/feature?id={feature['id']}", id="circuit-feature-link"),
    ])


dash.register_page(__name__, path="/circuit", name="Circuit", title="PIEscope — circuit", layout=layout)
