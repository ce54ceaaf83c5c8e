"""Launching PIE's Interpret and Evaluate from a page: an explain job, then a score job, with
live progress.

`interp_controls(prefix, listing)` is the form (explainer and rater from the API's
/api/interpreters, so "llm" appears only when the worker has PIESCOPE_LLM_* set; the corpus);
`first_request` and `advance` drive the chain through a dcc.Store holding {"stage", "job",
"score"}: the explain job runs first; when it is done, the score job is submitted with the same
target; when that is done the chain ends (or it stops at the first failure). Pure functions
over an ApiClient, so the pages' callbacks stay thin.
"""

from __future__ import annotations

from typing import Any

from dash import dcc, html, no_update

from frontend_dash.api_client import ApiError
from frontend_dash.components.views import error_note, note, progress_bar

ACTIVE = ("queued", "running")
CORPORA = (("default", "default corpus (Python docs + stories)"), ("stories", "IOI-like stories"))


def interp_controls(prefix: str, listing: dict[str, list[dict[str, Any]]], button: str,
                    extra: list[Any] | None = None) -> html.Div:
    """Explainer, rater and corpus choices and the launch button (ids `<prefix>-explainer`,
    `-rater`, `-corpus`, `-launch`); the chain's store, poll interval and status line."""
    explainers = [{"label": f"{e['name']} ({e['model']})", "value": e["name"]} for e in listing["explainers"]]
    raters = [{"label": r["name"] + (" (proxy)" if r["proxy"] else f" ({r['rater']})"), "value": r["name"]}
              for r in listing["raters"]]
    return html.Div([
        html.Div([
            html.Div([html.Label("explainer"), dcc.Dropdown(id=f"{prefix}-explainer", options=explainers,
                                                            value=explainers[0]["value"], clearable=False)],
                     style={"minWidth": "220px"}),
            html.Div([html.Label("rater"), dcc.Dropdown(id=f"{prefix}-rater", options=raters,
                                                        value=raters[0]["value"], clearable=False)],
                     style={"minWidth": "200px"}),
            html.Div([html.Label("corpus"), dcc.Dropdown(id=f"{prefix}-corpus", clearable=False, value="default",
                                                         options=[{"label": t, "value": v} for v, t in CORPORA])],
                     style={"minWidth": "260px"}),
            *(extra or []),
        ], className="pie-filters"),
        html.Button(button, id=f"{prefix}-launch", n_clicks=0),
        dcc.Store(id=f"{prefix}-chain"),
        dcc.Interval(id=f"{prefix}-poll", interval=500, disabled=True),
        html.Div(id=f"{prefix}-status"),
    ], className="pie-interp-launch")


def requests_for(target: dict[str, Any], explainer: str, rater: str, corpus: str) -> tuple[dict, dict]:
    """(explain params, score params) for one target ({"circuit_id"[, "prompt"]} or {"feature_id"})."""
    explain = {**target, "explainer": explainer, "corpus": corpus}
    score = {**target, "explainer": explainer, "rater": rater, "corpus": corpus}
    return explain, score


def job_line(job: dict[str, Any], prefix: str) -> html.Div:
    """"explain job #3: running 40% harvesting..." with a progress bar."""
    detail = job.get("error") or job.get("message") or ""
    text = f"{job['kind']} job #{job['id']}: {job['status']}" + (f" {detail}" if detail != job["status"] else "")
    return html.Div([html.Span(text + " "), progress_bar(job["progress"], job["status"],
                                                         bar_id=f"{prefix}-{job['kind']}-progress")],
                    className="pie-row")


def first_request(client, explain: dict[str, Any], score: dict[str, Any]) -> dict[str, Any]:
    """Submit the explain job; the chain's state."""
    job = client.submit_job("explain", explain)
    return {"stage": "explain", "job": job["id"], "score": score, "lines": [job["id"]]}


def advance(client, state: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]], bool, str | None]:
    """One poll of the chain -> (state, jobs so far, finished, failure message or None)."""
    jobs = [client.job(i) for i in state["lines"]]
    job = jobs[-1]
    if job["status"] in ACTIVE:
        return state, jobs, False, None
    if job["status"] != "done":
        return state, jobs, True, f"{job['kind']} job #{job['id']} {job['status']}: {job['error'] or job['message']}"
    if state["stage"] == "explain":
        scored = client.submit_job("score", state["score"])
        state = {**state, "stage": "score", "job": scored["id"], "lines": state["lines"] + [scored["id"]]}
        return state, jobs + [scored], scored["status"] == "done", None
    return state, jobs, True, None


def chain_view(jobs: list[dict[str, Any]], prefix: str, failure: str | None, finished: bool) -> html.Div:
    lines = [job_line(j, prefix) for j in jobs]
    if failure:
        lines.append(note(failure, "error"))
    elif finished:
        lines.append(note("explained and scored: the pages show the new examples, explanations and scores",
                          "info"))
    return html.Div(lines, id=f"{prefix}-lines")


def launch(client, target: dict[str, Any], explainer: str, rater: str, corpus: str) -> tuple[Any, bool, Any]:
    """Submit the explain job of an explain-then-score chain: (chain state, poll disabled, status)."""
    explain, score = requests_for(target, explainer, rater, corpus)
    try:
        state = first_request(client, explain, score)
    except ApiError as err:
        return None, True, error_note(err)
    return state, False, note(f"explain job #{state['job']} submitted")


def poll(client, state: dict[str, Any] | None, prefix: str, counter: int | None) -> tuple[Any, bool, Any, Any]:
    """One poll of a chain: (state, poll disabled, status view, counter); the counter (the page's
    refresh trigger) moves once, when the chain has finished."""
    if not state:
        return no_update, True, no_update, no_update
    try:
        state, jobs, finished, failure = advance(client, state)
    except ApiError as err:
        return no_update, True, error_note(err), no_update
    view = chain_view(jobs, prefix, failure, finished)
    if not finished:
        return state, False, view, no_update
    return state, True, view, (counter or 0) + 1
