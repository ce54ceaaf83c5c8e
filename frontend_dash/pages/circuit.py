"""Circuit: the attribution graph of a stored circuit, per prompt or aggregated over prompts.

/circuit?id=<circuit id>[&prompt=<index>]. Kept occurrences by layer (rows) and token position
(columns); edges filtered by a relative-weight threshold; hovering shows a feature's current
explanation; clicking a feature opens its panel. When the selected view has no stored graph, a
button POSTs a `graph` job and the page polls it until the graph can be drawn. The Neuronpedia
JSON export is served by the dashboard's /export route. "Explain and score this circuit" runs an
explain job and then a score job (explainer and rater from what the worker offers) on the
features of the prompt in view, or all of the circuit's, with live progress; the graph's hover
texts and the feature panel (examples, explanation, scores by rater) then fill in.

Readability: the graph is sized to the viewport (the token labels and the target on the first
screen), pans by drag and zooms by wheel; the search box rings the feature nodes whose id,
"L<layer> #<index>" or explanation contains the text. Pinning (the clicked node, or every
search match) collects node ids; "export subgraph" is the Neuronpedia JSON of the pinned nodes
(plus the target), served by the dashboard's /export/subgraph route from the API's
`POST .../subgraph`, which `POST /api/graphs/import` reads back. "Group by" picks a stored HAGD
hierarchy of the same model, transcoder and task, and a level: each cluster's features become
one supernode (components/supernodes); clicking a supernode expands it in place, unticking it
under "expanded" collapses it; the levels are drawn as an icicle with each cluster's stored
effects, and the level's clusters listed with their top members' explanations.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import dash
from dash import Input, Output, State, callback, dcc, html, no_update

from frontend_dash.api_client import ApiError, current_client
from frontend_dash.components.feature_views import scores_view
from frontend_dash.components.graph_figure import (aggregate_figure, clicked_feature, clicked_node, feature_key,
                                                   graph_figure, layout_aggregate_nodes, layout_prompt_nodes,
                                                   search_nodes, stored_graphs)
from frontend_dash.components.interp_launch import interp_controls, launch, poll
from frontend_dash.components.supernodes import SUPERNODE, cluster_rows, grouping, level_options, tree_figure
from frontend_dash.components.views import error_note, fmt, link, note, progress_bar, table

AGGREGATE = "aggregate"
POLL_MS = 500
DEFAULT_THRESHOLD = 0.05
MAX_PINS = 500          # pinned node ids in one export link (the URL carries them)
GRAPH_STYLE = {"height": "calc(100vh - 250px)", "minHeight": "340px"}   # fits 1280x800 with the controls


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
    """The circuit's identity and metrics as one compact line."""
    low, high = circuit["kl_ci95"]
    if circuit["method"] == "imported":
        return html.P(f"{circuit['model']} · {circuit['transcoder']} · an attribution graph imported from a file "
                      f"({circuit['k']} feature nodes) · nothing was measured on it (no KL, prediction change or "
                      "faithfulness)", className="pie-meta pie-summary")
    return html.P(f"{circuit['model']} · {circuit['transcoder']} · task {circuit['task']} · {circuit['method']} "
                  f"K={circuit['k']} ({circuit['budget']}) · N={circuit['n_prompts']} · KL {fmt(circuit['kl_mean'])} "
                  f"(95% CI {fmt(low)}–{fmt(high)}) · prediction changed {fmt(circuit['pred_change_rate'])} · "
                  f"faithfulness {fmt(circuit['faithfulness_mean'])}", className="pie-meta pie-summary")


def hierarchy_options(circuit: dict[str, Any]) -> list[dict[str, Any]]:
    """Stored HAGD hierarchies of the circuit's model, transcoder and task."""
    rows = current_client().hierarchies(model=circuit["model"], task=circuit["task"], limit=100)["items"]
    return [{"label": f"hierarchy #{h['id']} (levels {'/'.join(str(c) for c in h['levels'][1:])}, "
                      f"N={h['n_prompts']})", "value": h["id"]}
            for h in rows if h["transcoder"] == circuit["transcoder"]]


def layout(id: str | None = None, prompt: str | None = None, hierarchy: str | None = None,  # noqa: A002
           level: str | None = None, **_query: str) -> html.Div:
    if id is None or not str(id).isdigit():
        return html.Div([html.H2("Circuit"), note("pick a circuit on the Circuits page"), link("Circuits", "/")])
    try:
        circuit = current_client().circuit(int(id), fresh=True)
        listing = current_client().interpreters()
        hierarchies = hierarchy_options(circuit)
    except ApiError as err:
        return html.Div([html.H2("Circuit"), error_note(err)])
    view = _default_view(circuit, prompt)
    # ?hierarchy=<id>[&level=<l>] opens the page grouped (links and the README screenshots)
    chosen = int(hierarchy) if hierarchy and hierarchy.isdigit() and int(hierarchy) in [
        h["value"] for h in hierarchies] else None
    levels, start_level = [], None
    if chosen is not None:
        try:
            levels = level_options(current_client().hierarchy(chosen)["result"])
        except ApiError as err:
            return html.Div([html.H2("Circuit"), error_note(err)])
        values = [o["value"] for o in levels]
        start_level = int(level) if level and level.isdigit() and int(level) in values else (values or [None])[0]
    first = render_view(circuit["id"], view, DEFAULT_THRESHOLD, [], hierarchy_id=chosen, level=start_level)
    tree = show_hierarchy(start_level, chosen, view, circuit["id"]) if start_level is not None else []
    if isinstance(first[0], dict):
        first[0].pop("_matches", None)
    small = {"flex": "0 1 170px", "minWidth": "120px"}
    return html.Div([
        dcc.Store(id="circuit-id", data=circuit["id"]),
        dcc.Store(id="circuit-version", data=0),
        dcc.Store(id="circuit-job"),
        dcc.Store(id="circuit-pinned", data=[]),
        dcc.Store(id="circuit-matches", data=[]),
        dcc.Interval(id="circuit-poll", interval=POLL_MS, disabled=True),
        html.Div([html.H2(f"Circuit #{circuit['id']}", className="pie-inline-title"), summary(circuit)],
                 className="pie-title-row"),
        html.Div([
            html.Div([dcc.Dropdown(id="circuit-prompt", options=_prompt_options(circuit), value=view,
                                   clearable=False)], style={"flex": "2 1 300px"}, title="view"),
            html.Div([dcc.Slider(id="circuit-threshold", min=0, max=1, step=0.05, value=DEFAULT_THRESHOLD,
                                 marks={0: "0", 0.5: "edges ≥ 0.5 of max", 1: "1"})],
                     style={"flex": "1 1 220px"}, title="edge threshold (fraction of the largest |weight|)"),
            html.Div([dcc.Checklist(id="circuit-errors", options=[{"label": " error, pruned, bias", "value": "show"}],
                                    value=[])], style={"flex": "0 0 150px"}),
            html.Div([dcc.Input(id="circuit-search", type="search", debounce=True, placeholder="search id or explanation",
                                style={"width": "100%"}), html.Span(id="circuit-search-count", className="pie-meta")],
                     style={"flex": "1 1 200px"}),
        ], className="pie-filters pie-compact"),
        html.Div([
            html.Div(dcc.Dropdown(id="circuit-hierarchy", options=hierarchies, value=chosen, placeholder=(
                "group by a HAGD hierarchy…" if hierarchies else "no HAGD hierarchy for this model/transcoder/task"),
                disabled=not hierarchies), style={"flex": "1 1 260px"}),
            html.Div(dcc.Dropdown(id="circuit-level", options=levels, value=start_level, placeholder="level",
                                  clearable=False), style=small),
            html.Button("Compute graph", id="circuit-compute", n_clicks=0, style=first[3]),
            html.A("Neuronpedia JSON", id="circuit-export", href=first[4], target="_blank", style=first[5]),
            html.Button("pin clicked", id="circuit-pin", n_clicks=0, title="pin or unpin the last clicked node"),
            html.Button("pin matches", id="circuit-pin-matches", n_clicks=0),
            html.Button("clear pins", id="circuit-pin-clear", n_clicks=0),
            html.A("export subgraph", id="circuit-subgraph", href="", target="_blank", style={"display": "none"}),
            html.Span(id="circuit-pin-count", className="pie-meta"),
            html.Span(" · "), link("compare with…", f"/compare?a=fc{circuit['id']}"),
        ], className="pie-filters pie-compact pie-toolbar"),
        html.Div(dcc.Checklist(id="circuit-expanded", options=[], value=[], inline=True,
                               inputStyle={"marginLeft": "0.6em"}), id="circuit-expanded-row", className="pie-meta"),
        html.Div(id="circuit-job-status"),
        html.Div(first[2], id="circuit-graph-note"),
        html.Div([
            html.Div(dcc.Graph(id="circuit-graph", config={"displaylogo": False, "scrollZoom": True, "responsive": True},
                               **({} if first[0] is no_update else {"figure": first[0]}),
                               style={**GRAPH_STYLE, **first[1]}),
                     style={"flex": "3 1 640px", "minWidth": "0"}),
            html.Div(note("click a feature node to see it here; click a supernode to expand it"),
                     id="circuit-feature-panel", className="pie-panel", style={"flex": "1 1 260px"}),
        ], className="pie-row pie-graph-row"),
        html.Div(tree, id="circuit-hierarchy-view"),
        html.Details([html.Summary("Explain and score this circuit"), interp_controls(
            "circuit-interp", listing, "Explain and score this circuit",
            extra=[html.Div([html.Label("features"), dcc.RadioItems(id="circuit-interp-scope", value="prompt", options=[
                {"label": " those of the prompt in view", "value": "prompt"},
                {"label": " all the circuit's", "value": "all"}])])])], open=True, id="circuit-interp"),
    ])


def _explanations(circuit: dict[str, Any], nodes: list[dict[str, Any]]) -> dict[str, str]:
    keys = [(n["layer"], n["feature"]) for n in nodes if n["kind"] == "feature"]
    if not keys:
        return {}
    found = current_client().explanations_by_feature(circuit["transcoder"], keys)
    return {feature_key(l, f): row["text"] for (l, f), row in found.items()}


@callback(Output("circuit-level", "options"), Output("circuit-level", "value"), Output("circuit-expanded", "options"),
          Output("circuit-expanded", "value", allow_duplicate=True),
          Input("circuit-hierarchy", "value"), prevent_initial_call=True)
def pick_hierarchy(hierarchy_id: int | None):
    """The chosen hierarchy's levels (coarsest first, preselected); nothing expanded."""
    if hierarchy_id is None:
        return [], None, [], []
    try:
        options = level_options(current_client().hierarchy(hierarchy_id)["result"])
    except ApiError:
        return [], None, [], []
    return options, (options[0]["value"] if options else None), [], []


@callback(Output("circuit-expanded", "options", allow_duplicate=True),
          Output("circuit-expanded", "value", allow_duplicate=True),
          Input("circuit-level", "value"), State("circuit-expanded", "value"), prevent_initial_call=True)
def new_level(_level: int | None, expanded: list[str] | None):
    """Another level has other clusters: nothing is expanded."""
    return ([], []) if expanded else (no_update, no_update)


@callback(Output("circuit-graph", "figure"), Output("circuit-graph", "style"), Output("circuit-graph-note", "children"),
          Output("circuit-compute", "style"), Output("circuit-export", "href"), Output("circuit-export", "style"),
          Output("circuit-search-count", "children"), Output("circuit-matches", "data"),
          Input("circuit-prompt", "value"), Input("circuit-threshold", "value"), Input("circuit-errors", "value"),
          Input("circuit-version", "data"), Input("circuit-search", "value"), Input("circuit-level", "value"),
          Input("circuit-expanded", "value"), Input("circuit-pinned", "data"),
          State("circuit-hierarchy", "value"), State("circuit-id", "data"), prevent_initial_call=True)
def render_graph(view: str, threshold: float, errors: list[str], _version: int, query: str | None,
                 level: int | None, expanded: list[str] | None, pinned: list[str] | None,
                 hierarchy_id: int | None, circuit_id: int):
    """Redraw on a new view, threshold, error toggle, search, grouping, expansion, pins or graph."""
    figure, style, text, compute, href, export = render_view(circuit_id, view, threshold, errors, query=query,
                                                             hierarchy_id=hierarchy_id, level=level,
                                                             expanded=expanded, pinned=pinned)
    matches = figure.pop("_matches", []) if isinstance(figure, dict) else []
    count = f"{len(matches)} match(es)" if query else ""
    return figure, {**GRAPH_STYLE, **style}, text, compute, href, export, count, matches


def render_view(circuit_id: int, view: str, threshold: float, errors: list[str] | None, *, query: str | None = None,
                hierarchy_id: int | None = None, level: int | None = None, expanded: list[str] | None = None,
                pinned: list[str] | None = None) -> tuple:
    """(figure, graph style, note, compute-button style, export href, export style) of a view;
    the layout draws the first view with it, the callback every later one. The figure is a dict
    whose "_matches" lists the search matches' node ids (the callback takes it out)."""
    hidden, shown = {"display": "none"}, {}
    try:
        client = current_client()
        circuit = client.circuit(circuit_id)
        per_prompt, aggregate = stored_graphs(circuit)
        group = None
        if hierarchy_id is not None and level is not None:
            group = grouping(client.hierarchy(hierarchy_id)["result"], int(level), expanded)
        common = {"threshold": threshold or 0.0, "group": group, "query": query, "pinned": set(pinned or ())}
        if view == AGGREGATE:
            if aggregate is None:
                return (no_update, hidden, note("no graph computed yet for this circuit: compute it (all prompts)"),
                        shown, "", hidden)
            explanations = _explanations(circuit, aggregate["nodes"])
            figure = aggregate_figure(aggregate, explanations=explanations, height=None, as_dict=True, **common)
            matches = search_nodes(layout_aggregate_nodes(aggregate), explanations, query)
            first = min(per_prompt) if per_prompt else None
            href = "" if first is None else f"/export/circuit/{circuit_id}/{per_prompt[first][0]}.json?prompt={first}"
            return _with_matches(figure, matches), shown, "", hidden, href, shown if href else hidden
        index = int(view)
        if index not in per_prompt:
            return no_update, hidden, note(f"no graph computed yet for prompt {index}: compute it"), shown, "", hidden
        key, graph = per_prompt[index]
        explanations = _explanations(circuit, graph["nodes"])
        show_errors = "show" in (errors or [])
        figure = graph_figure(graph, explanations=explanations, show_errors=show_errors, as_dict=True, **common)
        matches = search_nodes(layout_prompt_nodes(graph, show_errors), explanations, query)
        return (_with_matches(figure, matches), shown, "", hidden,
                f"/export/circuit/{circuit_id}/{key}.json?prompt={index}", shown)
    except ApiError as err:
        return no_update, hidden, error_note(err), hidden, "", hidden


def _with_matches(figure: dict[str, Any], matches: set[str]) -> dict[str, Any]:
    return {**figure, "_matches": sorted(matches)}


@callback(Output("circuit-expanded", "options", allow_duplicate=True),
          Output("circuit-expanded", "value", allow_duplicate=True),
          Input("circuit-graph", "clickData"), State("circuit-expanded", "options"), State("circuit-expanded", "value"),
          prevent_initial_call=True)
def expand_supernode(click_data: dict[str, Any] | None, options: list[dict[str, Any]], value: list[str]):
    """A click on a supernode expands its cluster in place (listed under "expanded": untick to collapse)."""
    node = clicked_node(click_data)
    if node is None or node[1] != SUPERNODE:
        return no_update, no_update
    cid = str(node[3])
    options = list(options or [])
    if cid not in [o["value"] for o in options]:
        options.append({"label": f" {cid} expanded", "value": cid})
    return options, sorted(set(value or []) | {cid})


@callback(Output("circuit-pinned", "data"), Output("circuit-pin-count", "children"), Output("circuit-subgraph", "href"),
          Output("circuit-subgraph", "style"),
          Input("circuit-pin", "n_clicks"), Input("circuit-pin-matches", "n_clicks"), Input("circuit-pin-clear", "n_clicks"),
          Input("circuit-prompt", "value"),
          State("circuit-graph", "clickData"), State("circuit-matches", "data"), State("circuit-pinned", "data"),
          State("circuit-id", "data"), prevent_initial_call=True)
def pin_nodes(_pin: int, _matches: int, _clear: int, view: str, click_data: dict[str, Any] | None,
              matches: list[str] | None, pinned: list[str] | None, circuit_id: int):
    """Pin or unpin the clicked node (a supernode: all its members), pin every search match, or
    clear; a new view clears the pins. The export link carries the pinned ids."""
    trigger = dash.ctx.triggered_id
    pins = list(pinned or [])
    if trigger == "circuit-pin":
        node = clicked_node(click_data)
        ids = []
        if node is not None:
            ids = str(node[4]).split(",") if node[1] == SUPERNODE and len(node) > 4 else [node[0]]
        if ids and all(i in pins for i in ids):
            pins = [p for p in pins if p not in ids]
        else:
            pins += [i for i in ids if i not in pins]
    elif trigger == "circuit-pin-matches":
        pins += [m for m in (matches or []) if m not in pins]
    else:
        pins = []
    pins = pins[:MAX_PINS]
    if not pins or view == AGGREGATE or not str(view).isdigit():
        note_text = "" if not pins else f"{len(pins)} pinned (export needs a prompt view)"
        return pins, note_text, "", {"display": "none"}
    try:
        per_prompt, _ = stored_graphs(current_client().circuit(circuit_id))
    except ApiError:
        return pins, f"{len(pins)} pinned", "", {"display": "none"}
    key = per_prompt[int(view)][0] if int(view) in per_prompt else None
    if key is None:
        return pins, f"{len(pins)} pinned", "", {"display": "none"}
    href = (f"/export/subgraph/{circuit_id}/{quote(key)}.json?prompt={int(view)}&nodes="
            + quote(",".join(pins), safe=","))
    return pins, f"{len(pins)} pinned", href, {}


@callback(Output("circuit-hierarchy-view", "children"), Input("circuit-level", "value"),
          State("circuit-hierarchy", "value"), State("circuit-prompt", "value"), State("circuit-id", "data"),
          prevent_initial_call=True)
def show_hierarchy(level: int | None, hierarchy_id: int | None, view: str, circuit_id: int):
    """The icicle of the hierarchy's levels and the chosen level's clusters with their effects."""
    if hierarchy_id is None or level is None:
        return []
    client = current_client()
    try:
        detail = client.hierarchy(hierarchy_id)
        circuit = client.circuit(circuit_id)
    except ApiError as err:
        return error_note(err)
    result = detail["result"]
    in_graph = {(f["layer"], f["feature"]) for f in circuit["features"]}
    group = grouping(result, int(level))
    keys = [k for ks in group.members.values() for k in ks]
    found = client.explanations_by_feature(circuit["transcoder"], keys) if keys else {}
    explanations = {feature_key(l, f): row["text"] for (l, f), row in found.items()}
    rows = cluster_rows(result, int(level), explanations, in_graph)
    score = (result.get("config") or {}).get("score")
    return html.Div([
        html.H3(f"HAGD hierarchy #{hierarchy_id}: level {level} of {len(result['hierarchy']['counts']) - 1}"),
        html.P(f"clusters per level (finest first) {result['hierarchy']['counts']}; the run scored clusters by "
               f"{score} ({'measured' if score == 'ablation' else 'predicted' if score == 'scorer' else 'baseline'}); "
               f"sufficiency {fmt(detail['sufficiency_mean'])} ± {fmt(detail['sufficiency_std'])}, necessity "
               f"{fmt(detail['necessity_mean'])} ± {fmt(detail['necessity_std'])} of its "
               f"{detail['circuit_size']}-feature circuit", className="pie-meta"),
        dcc.Graph(id="circuit-tree", figure=tree_figure(result, int(level)), config={"displaylogo": False}),
        table(rows, [("cluster", "cluster"), ("features", "features"), ("in this circuit", "in this graph"),
                     ("predicted (scorer)", "predicted"), ("measured (ablation)", "measured"),
                     ("attribution mass", "mass"), ("top members", "top members")], table_id="circuit-clusters"),
    ])


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
    node = clicked_node(click_data)
    if node is not None and node[1] == SUPERNODE:
        members = str(node[4]).split(",") if len(node) > 4 else []
        return html.Div([html.H3(f"Supernode {node[3]}", id="circuit-feature-title"),
                         html.P(f"{len(members)} node(s) of this graph, expanded in place: untick "
                                f"\"{node[3]} expanded\" above the graph to collapse it", className="pie-meta"),
                         html.P(", ".join(members[:60]) + (" …" if len(members) > 60 else ""), className="pie-meta")])
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
