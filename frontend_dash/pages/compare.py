"""Compare: two or more stored results of any family side by side.

/compare?ids=fc3,ec1,h2 (fc: feature circuit, ec: edge circuit, h: a HAGD hierarchy's circuit;
/compare?a=3&b=4 still means two feature circuits). The same metrics in the same units for
every result (KL in nats where measured, behaviour recovered as a share of M with each family's
definition stated, units kept with their kind, seconds), each result's units by layer next to
each other with the units another selected result also holds in gold, and the units they
differ on with their explanations (features) or layer.head (heads). Two feature circuits also
get the shared / only-in tables and the per-prompt KL difference of before.
"""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, callback, dcc, html

from frontend_dash.api_client import ApiError, current_client
from frontend_dash.components.compare import (FAMILIES, KL_UNIT, RECOVERED, difference_rows, feature_sets, jaccard,
                                              kl_difference_figure, label, metric_rows, normalise, parse_refs,
                                              shared_units, split_ref, units_figure)
from frontend_dash.components.views import error_note, fmt, link, note, table

MAX_RESULTS = 6


def _options() -> list[dict[str, Any]]:
    client = current_client()
    options = [{"label": f"fc{c['id']} · feature circuit · {label(c)} · {c['model']}", "value": f"fc{c['id']}"}
               for c in client.circuits(limit=500)["items"]]
    options += [{"label": f"ec{c['id']} · edge circuit · {c['method']} {c['n_kept']} edges ({c['task']}) · {c['model']}",
                 "value": f"ec{c['id']}"} for c in client.edge_circuit_list(limit=500)["items"]]
    options += [{"label": f"h{h['id']} · HAGD circuit · {h['circuit_size']} features ({h['task']}) · {h['model']}",
                 "value": f"h{h['id']}"} for h in client.hierarchies(limit=500)["items"]]
    return options


def layout(ids: str | None = None, a: str | None = None, b: str | None = None, **_query: str) -> html.Div:
    try:
        options = _options()
    except ApiError as err:
        return html.Div([html.H2("Compare results"), error_note(err)])
    if not options:
        return html.Div([html.H2("Compare results"), note("nothing stored yet: launch jobs from Jobs")])
    known = [o["value"] for o in options]
    chosen = [r for r in parse_refs(ids if ids else ",".join(x for x in (a, b) if x)) if r in known]
    for ref in known:   # two by default: the newest feature circuits, or whatever is stored
        if len(chosen) >= 2:
            break
        if ref not in chosen:
            chosen.append(ref)
    return html.Div([
        html.H2("Compare results"),
        html.Div([html.Div([html.Label(f"results (two to {MAX_RESULTS}, any family)"),
                            dcc.Dropdown(id="compare-ids", options=options, value=chosen, multi=True)],
                           style={"flex": "1 1 700px"})], className="pie-filters"),
        html.Div(id="compare-body"),
    ])


def _fetch(ref: str) -> dict[str, Any]:
    family, rid = split_ref(ref)
    client = current_client()
    if family == "fc":
        return client.circuit(rid, fresh=True)
    if family == "ec":
        return client.edge_circuit_detail(rid)
    return client.hierarchy(rid)


def _explanations(results: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(transcoder, "F:l_f") -> the feature's current explanation, for the feature results."""
    out = {}
    for space in {r["space"] for r in results if r["family"] in ("fc", "h")}:
        keys = {tuple(int(x) for x in u[2:].split("_")) for r in results if r["space"] == space
                for u in r["units"] if u.startswith("F:")}
        found = current_client().explanations_by_feature(space, sorted(keys)) if keys else {}
        out.update({(space, f"F:{l}_{f}"): row["text"] for (l, f), row in found.items()})
    return out


def _result_link(r: dict[str, Any]):
    family, rid = split_ref(r["ref"])
    if family == "fc":
        return link(r["label"], f"/circuit?id={rid}")
    return html.Span(r["label"])


@callback(Output("compare-body", "children"), Input("compare-ids", "value"))
def compare(refs: list[str] | None):
    refs = list(refs or [])[:MAX_RESULTS]
    if not refs:
        return note("pick two or more results")
    try:
        details = {ref: _fetch(ref) for ref in refs}
        results = [normalise(ref, details[ref]) for ref in refs]
        explanations = _explanations(results)
    except ApiError as err:
        return error_note(err)
    where = shared_units(results)
    shared = {key for key, holders in where.items() if len(holders) >= 2}
    tasks = {r["task"] for r in results}
    warnings = [] if len(refs) >= 2 else [note("one result: pick another to compare it with")]
    if len(tasks) > 1:
        warnings.append(note(f"different tasks ({', '.join(sorted(tasks))}): the metrics are not of the same behaviour",
                             "warning"))
    if len({r['space'] for r in results if r['family'] != 'ec'}) > 1:
        warnings.append(note("feature results of different transcoders: their feature ids are not comparable",
                             "warning"))
    columns = [(h, h) for h in ("result", "family", "model", "task", "kept", "KL (nats)", "KL 95% CI",
                                "recovered (share of M)", "± std", "seconds")]
    definitions = [html.Li(f"{FAMILIES[f]}: {RECOVERED[f]}") for f in sorted({r["family"] for r in results})]
    body = warnings + [
        table(metric_rows(results), columns, table_id="compare-metrics"),
        html.Div([html.Span(f"KL: {KL_UNIT}; empty where the family does not measure it. Behaviour recovered:"),
                  html.Ul(definitions)], className="pie-meta"),
        html.P(f"{len(shared)} unit(s) held by two or more of the results (gold in the graphs); "
               f"{len(where) - len(shared)} held by one", id="compare-summary"),
        html.Div([html.Div([html.H4([_result_link(r), html.Span(f" · {r['kept']}", className="pie-meta")]),
                            dcc.Graph(id={"type": "compare-graph", "ref": r["ref"]}, figure=units_figure(r, shared),
                                      config={"displaylogo": False, "scrollZoom": True})], className="pie-col")
                  for r in results], className="pie-row", id="compare-graphs"),
        html.H4("where they differ"),
        table(difference_rows(results, explanations), [("unit", "unit"), ("in", "in"), ("not in", "not in"),
                                                       ("explanation / role", "explanation")],
              table_id="compare-differences", empty="they hold the same units"),
    ]
    fcs = [ref for ref in refs if ref.startswith("fc")]
    if len(fcs) == 2:
        a, b = details[fcs[0]], details[fcs[1]]
        sets = feature_sets(a, b)
        body += [html.P(f"{fcs[0]} vs {fcs[1]}: {len(sets['shared'])} shared features, {len(sets['only_a'])} only in "
                        f"{fcs[0]}, {len(sets['only_b'])} only in {fcs[1]} (Jaccard {fmt(jaccard(sets))})",
                        id="compare-feature-summary"),
                 dcc.Graph(id="compare-kl", figure=kl_difference_figure(a, b), config={"displaylogo": False})]
    return html.Div(body)


dash.register_page(__name__, path="/compare", name="Compare", title="PIEscope — compare results", layout=layout)
