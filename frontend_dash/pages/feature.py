"""Feature: examples, logit lens, histogram, every explanation with its source and FADE scores, and
annotation (write or edit an explanation; rate one 0/1/2 as FADE raters do; label; comment), and
human ratings of each top-activating example against one explanation (annotations labelled
"example:<rank>", the FADE "human" rater; re-rating edits the existing annotation). Examples say
whether the explainer saw them or they are held out (only held-out ones are rated); scores are
shown per rater, the offline proxy rater apart. "Harvest, explain and score this feature" runs an
explain job and then a score job on this one feature, with live progress, and refreshes the page.

/feature?id=<feature id>, or /feature?transcoder=<model/dir>&layer=<l>&index=<i>. Everything is
saved through the API; user text is always rendered as text.
"""

from __future__ import annotations

from typing import Any

import dash
from dash import ALL, Input, Output, State, callback, dcc, html, no_update

from frontend_dash.api_client import ApiError, current_client
from frontend_dash.components.feature_views import (EXAMPLE_RATING, NOT_HARVESTED, RATING_SCALE, example_label,
                                                    example_rank, example_ratings, examples_view, has_statistics,
                                                    histogram_figure, logit_lens_view, scores_view)
from frontend_dash.components.interp_launch import interp_controls, launch, poll
from frontend_dash.components.views import error_note, note


FEATURE_ITSELF = "feature"
NEW = "new"
RATINGS = [{"label": " 0 absent", "value": 0}, {"label": " 1 vague", "value": 1}, {"label": " 2 clearly present", "value": 2}]


def _load(id: str | None, transcoder: str | None, layer: str | None, index: str | None) -> dict[str, Any]:  # noqa: A002
    client = current_client()
    if id is not None and str(id).isdigit():
        return client.feature(int(id))
    if transcoder and layer is not None and index is not None and layer.isdigit() and index.isdigit():
        return client.lookup_feature(transcoder, int(layer), int(index))
    raise ApiError(400, "open a feature from a circuit graph, or give ?id= or ?transcoder=&layer=&index=")


def layout(id: str | None = None, transcoder: str | None = None, layer: str | None = None,  # noqa: A002
           index: str | None = None, **_query: str) -> html.Div:
    try:
        feature = _load(id, transcoder, layer, index)
    except ApiError as err:
        return html.Div([html.H2("Feature"), error_note(err)])
    try:
        listing = current_client().interpreters()
    except ApiError as err:
        return html.Div([html.H2("Feature"), error_note(err)])
    examples = feature.get("examples") or []
    return html.Div([
        dcc.Store(id="feature-id", data=feature["id"]),
        dcc.Store(id="feature-refresh", data=0),
        html.H2(f"Feature L{feature['layer']} #{feature['index']}"),
        html.P(f"{feature['model']} · {feature['transcoder']}", className="pie-meta"),
        html.Div([
            html.Div([
                html.H3("Top-activating examples"),
                _rating_block(visible=bool(examples)),
                html.Div(_evidence(feature), id="feature-evidence"),
            ], className="pie-col"),
            html.Div([
                html.H3("Harvest, explain and score this feature"),
                interp_controls("feature-interp", listing, "Harvest, explain and score this feature"),
                html.H3("Explanations"),
                html.Div(id="feature-explanations"),
                html.H3("Write or edit an explanation"),
                _explanation_form(),
                html.H3("Annotate"),
                _annotation_form(),
                html.Div(id="feature-status"),
            ], className="pie-col pie-form"),
        ], className="pie-row"),
    ])


def _evidence(feature: dict[str, Any]) -> list[Any]:
    """Examples, logit lens and histogram of a feature (or the note that it is not harvested)."""
    stats = feature.get("statistics") or {}
    examples = feature.get("examples") or []
    if not (examples or has_statistics(stats)):
        return [note(NOT_HARVESTED, "warning")]
    histogram = histogram_figure(stats)
    return [examples_view(examples, rateable=True), html.H3("Logit lens"), logit_lens_view(stats),
            dcc.Graph(id="feature-histogram", figure=histogram, config={"displaylogo": False})
            if histogram is not None else note("no activation histogram (" + NOT_HARVESTED + ")")]


def _rating_block(visible: bool) -> html.Div:
    """The caption, the explanation the examples are rated against, and the save status (always
    in the layout, for the callbacks; hidden without examples)."""
    return html.Div([
        html.Div(RATING_SCALE, className="pie-meta", id="feature-rate-caption"),
        dcc.Dropdown(id="feature-rate-target", options=[], value=None, clearable=False,
                     placeholder="no explanation to rate against yet"),
        html.Div(id="feature-rate-status"),
    ], id="feature-rate", style=None if visible else {"display": "none"})


def _explanation_form() -> html.Div:
    return html.Div([
        html.Label("explanation"),
        dcc.Dropdown(id="feature-expl-target", options=[{"label": "a new explanation", "value": NEW}], value=NEW,
                     clearable=False),
        html.Label("text"),
        dcc.Textarea(id="feature-expl-text", value="", style={"width": "100%", "height": "5em"}),
        html.Label("your name"),
        dcc.Input(id="feature-author", type="text", value="", placeholder="optional"),
        html.Button("Save explanation", id="feature-expl-save", n_clicks=0),
    ])


def _annotation_form() -> html.Div:
    return html.Div([
        html.Label("about"),
        dcc.Dropdown(id="feature-ann-target", options=[{"label": "the feature itself", "value": FEATURE_ITSELF}],
                     value=FEATURE_ITSELF, clearable=False),
        html.Label("FADE rating: is the explained concept present in the examples?"),
        dcc.RadioItems(id="feature-ann-rating", options=RATINGS, value=None, inline=True),
        html.Label("label"),
        dcc.Input(id="feature-ann-label", type="text", value="", placeholder="e.g. name-mover"),
        html.Label("comment"),
        dcc.Textarea(id="feature-ann-comment", value="", style={"width": "100%", "height": "4em"}),
        html.Button("Save annotation", id="feature-ann-save", n_clicks=0),
    ])


def _annotation_line(a: dict[str, Any]) -> html.Div:
    parts = []
    if a["rating"] is not None:
        parts.append(f"rating {a['rating']}")
    if a["label"]:
        parts.append(f"label: {a['label']}")
    if a["comment"]:
        parts.append(f"comment: {a['comment']}")
    who = f" — {a['author']}" if a["author"] else ""
    return html.Div(" · ".join(parts) + who, className="pie-meta pie-annotation")


def _explanation_card(client, e: dict[str, Any]) -> html.Div:
    scores = client.scores(e["id"])
    annotations = [a for a in client.explanation_annotations(e["id"]) if example_rank(a) is None]
    return html.Div([
        html.Div(e["text"], className="pie-explanation-text", id={"type": "explanation-text", "id": e["id"]}),
        html.Div(f"#{e['id']} · {e['source']}" + (f" ({e['model']})" if e.get("model") else "")
                 + (f" · {e['author']}" if e["author"] else "") + f" · revision {e['revision']}",
                 className="pie-meta"),
        scores_view(scores),
        html.Div([_annotation_line(a) for a in annotations]),
    ], className="pie-explanation")


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


@callback(Output("feature-explanations", "children"), Output("feature-expl-target", "options"),
          Output("feature-ann-target", "options"), Output("feature-rate-target", "options"),
          Output("feature-rate-target", "value"), Input("feature-refresh", "data"), State("feature-id", "data"),
          State("feature-rate-target", "value"))
def show_explanations(_refresh: int, feature_id: int, rate_target: int | None):
    client = current_client()
    try:
        feature = client.feature(feature_id)
        explanations = sorted(feature["explanations"], key=lambda e: e["id"])
        cards = [_explanation_card(client, e) for e in explanations]
        own = client.feature_annotations(feature_id)
    except ApiError as err:
        return error_note(err), no_update, no_update, no_update, no_update
    choices = [{"label": f"#{e['id']} ({e['source']}): {_short(e['text'])}", "value": e["id"]} for e in explanations]
    body = cards or [note("no explanation yet: write the first one below")]
    if own:
        body = body + [html.H4("Notes on the feature"), html.Div([_annotation_line(a) for a in own])]
    ids = [e["id"] for e in explanations]
    rate_target = rate_target if rate_target in ids else (ids[0] if ids else None)
    return (html.Div(body), [{"label": "a new explanation", "value": NEW}] + choices,
            [{"label": "the feature itself", "value": FEATURE_ITSELF}] + choices,
            [{**c, "label": "rate against " + c["label"]} for c in choices], rate_target)


def _rated_count(ratings: dict[int, Any], ranks: list[int]) -> str:
    return f"{sum(r in ratings for r in ranks)} of {len(ranks)} examples rated"


@callback(Output({"type": EXAMPLE_RATING, "rank": ALL}, "value"), Output("feature-rate-status", "children"),
          Input("feature-rate-target", "value"), State({"type": EXAMPLE_RATING, "rank": ALL}, "id"))
def show_example_ratings(target: int | None, ids: list[dict[str, Any]]):
    """The stored ratings of the examples for the explanation rated against."""
    if not ids:
        return [], None
    if target is None:
        return [None] * len(ids), note("write an explanation first, then rate the examples against it")
    try:
        ratings = example_ratings(current_client().explanation_annotations(int(target)))
    except ApiError as err:
        return [no_update] * len(ids), error_note(err)
    ranks = [i["rank"] for i in ids]
    return ([ratings[r]["rating"] if r in ratings else None for r in ranks],
            html.Div(_rated_count(ratings, ranks), className="pie-meta"))


@callback(Output("feature-rate-status", "children", allow_duplicate=True),
          Input({"type": EXAMPLE_RATING, "rank": ALL}, "value"), State({"type": EXAMPLE_RATING, "rank": ALL}, "id"),
          State("feature-rate-target", "value"), State("feature-author", "value"), prevent_initial_call=True)
def save_example_ratings(values: list[int | None], ids: list[dict[str, Any]], target: int | None,
                         author: str | None):
    """Store every shown rating that differs from the stored one: a new "example:<rank>" annotation,
    or an edit of the existing one (so values set by show_example_ratings change nothing)."""
    chosen = {i["rank"]: v for i, v in zip(ids, values) if v is not None}
    if not chosen:
        return no_update
    if target is None:
        return note("write an explanation first, then rate the examples against it", "warning")
    client = current_client()
    saved = []
    try:
        ratings = example_ratings(client.explanation_annotations(int(target)))
        for rank, value in sorted(chosen.items()):
            old = ratings.get(rank)
            if old is not None and old["rating"] == value:
                continue
            if old is not None:
                ratings[rank] = client.update_annotation(old["id"], rating=value)
            else:
                ratings[rank] = client.rate_example(int(target), example_label(rank), value, author or "")
            saved.append(f"example {rank} rated {value}")
    except ApiError as err:
        return error_note(err)
    if not saved:
        return no_update
    count = _rated_count(ratings, [i["rank"] for i in ids])
    return note(f"saved for explanation #{target}: {', '.join(saved)} ({count})")


@callback(Output("feature-expl-text", "value"), Input("feature-expl-target", "value"), State("feature-id", "data"),
          prevent_initial_call=True)
def load_for_edit(target: Any, feature_id: int):
    if target == NEW:
        return ""
    try:
        feature = current_client().feature(feature_id)
    except ApiError:
        return no_update
    return next((e["text"] for e in feature["explanations"] if e["id"] == target), "")


@callback(Output("feature-refresh", "data"), Output("feature-status", "children"),
          Input("feature-expl-save", "n_clicks"), State("feature-expl-target", "value"),
          State("feature-expl-text", "value"), State("feature-author", "value"), State("feature-id", "data"),
          State("feature-refresh", "data"), prevent_initial_call=True)
def save_explanation(n_clicks: int, target: Any, text: str | None, author: str | None, feature_id: int,
                     refresh: int):
    if not n_clicks:
        return no_update, no_update
    if not (text or "").strip():
        return no_update, note("write the explanation first", "warning")
    client = current_client()
    try:
        if target == NEW:
            saved = client.create_explanation(feature_id, text.strip(), author or "")
        else:
            saved = client.update_explanation(int(target), text.strip(), author or "")
    except ApiError as err:
        return no_update, error_note(err)
    return (refresh or 0) + 1, note(f"saved explanation #{saved['id']} (revision {saved['revision']})")


@callback(Output("feature-refresh", "data", allow_duplicate=True),
          Output("feature-status", "children", allow_duplicate=True),
          Output("feature-ann-label", "value"), Output("feature-ann-comment", "value"),
          Input("feature-ann-save", "n_clicks"), State("feature-ann-target", "value"),
          State("feature-ann-rating", "value"), State("feature-ann-label", "value"),
          State("feature-ann-comment", "value"), State("feature-author", "value"), State("feature-id", "data"),
          State("feature-refresh", "data"), prevent_initial_call=True)
def save_annotation(n_clicks: int, target: Any, rating: int | None, label: str | None, comment: str | None,
                    author: str | None, feature_id: int, refresh: int):
    if not n_clicks:
        return no_update, no_update, no_update, no_update
    if rating is None and not (label or "").strip() and not (comment or "").strip():
        return no_update, note("give a rating, a label or a comment", "warning"), no_update, no_update
    if rating is not None and target == FEATURE_ITSELF:
        return (no_update, note("ratings are about an explanation: pick one under 'about'", "warning"),
                no_update, no_update)
    client = current_client()
    try:
        saved = client.annotate(explanation_id=None if target == FEATURE_ITSELF else int(target),
                                feature_id=feature_id, rating=rating, label=(label or "").strip() or None,
                                comment=(comment or "").strip() or None, author=author or "")
    except ApiError as err:
        return no_update, error_note(err), no_update, no_update
    return (refresh or 0) + 1, note(f"saved annotation #{saved['id']}"), "", ""


@callback(Output("feature-evidence", "children"), Output("feature-rate", "style"),
          Input("feature-refresh", "data"), State("feature-id", "data"), prevent_initial_call=True)
def refresh_evidence(_refresh: int, feature_id: int):
    """Examples and statistics again (after a harvest)."""
    try:
        feature = current_client().feature(feature_id)
    except ApiError as err:
        return error_note(err), no_update
    return _evidence(feature), None if feature.get("examples") else {"display": "none"}


@callback(Output("feature-interp-chain", "data"), Output("feature-interp-poll", "disabled"),
          Output("feature-interp-status", "children"), Input("feature-interp-launch", "n_clicks"),
          State("feature-interp-explainer", "value"), State("feature-interp-rater", "value"),
          State("feature-interp-corpus", "value"), State("feature-id", "data"), prevent_initial_call=True)
def launch_interpretation(n_clicks: int, explainer: str, rater: str, corpus: str, feature_id: int):
    if not n_clicks:
        return no_update, no_update, no_update
    return launch(current_client(), {"feature_id": feature_id}, explainer, rater, corpus)


@callback(Output("feature-interp-chain", "data", allow_duplicate=True),
          Output("feature-interp-poll", "disabled", allow_duplicate=True),
          Output("feature-interp-status", "children", allow_duplicate=True),
          Output("feature-refresh", "data", allow_duplicate=True),
          Input("feature-interp-poll", "n_intervals"), State("feature-interp-chain", "data"),
          State("feature-refresh", "data"), prevent_initial_call=True)
def poll_interpretation(_n: int, state: dict[str, Any] | None, refresh: int):
    return poll(current_client(), state, "feature-interp", refresh)


dash.register_page(__name__, path="/feature", name="Feature", title="PIEscope — feature", layout=layout)
