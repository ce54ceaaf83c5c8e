"""The PIEscope dashboard: `create_dash_app(settings)` builds a multi-page Dash app over the API.

The app only speaks HTTP to the worker API at `settings.api_url` (writes carry
`settings.api_token`) through one `ApiClient`, kept in the Flask config for the pages'
callbacks (`frontend_dash.api_client.current_client`). Pages live in `frontend_dash.pages`,
one module each with its layout and callbacks. `serve(settings)` runs it on
settings.dash_host:dash_port (127.0.0.1:8050 by default).

Besides Dash's own routes the server answers /export/circuit/<id>/<key>.json, the Neuronpedia
graph JSON of a stored graph fetched from the API, so the browser never needs to reach the API,
and /export/subgraph/<id>/<key>.json?prompt=P&nodes=a,b,... the subgraph of pinned nodes.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys

import dash
from dash import dcc, html
from flask import Response, request

from backend.settings import Settings
from frontend_dash.api_client import CONFIG_KEY, ApiClient, ApiError

log = logging.getLogger(__name__)

PAGES = ("circuits", "circuit", "sweep", "compare", "feature", "jobs",
         "edge_circuits", "edge_circuit", "edge_sweep", "task_overview")
NAV = (("Circuits", "/"), ("KL-vs-K", "/sweep"), ("Compare", "/compare"), ("Jobs", "/jobs"),
       ("Edge circuits", "/edge-circuits"), ("Edge sweeps", "/edge-sweep"), ("Task overview", "/task-overview"))


def _import_pages() -> None:
    """Import (or, for a second app in this process, re-run) each page module so that it registers
    its page and callbacks with the app being built."""
    for name in PAGES:
        module = f"frontend_dash.pages.{name}"
        if module in sys.modules:
            importlib.reload(sys.modules[module])
        else:
            importlib.import_module(module)


def _shell() -> html.Div:
    nav = html.Nav([html.Span("PIEscope", className="pie-brand")]
                   + [dcc.Link(text, href=href, id=f"nav-{text.lower().replace(' ', '-')}") for text, href in NAV], className="pie-nav")
    return html.Div([nav, html.Div(dash.page_container, className="pie-page")])


def _export_route(client: ApiClient):
    def export(circuit_id: int, key: str) -> Response:
        prompt = request.args.get("prompt", type=int)
        try:
            data = client.neuronpedia(circuit_id, key, prompt)
        except ApiError as err:
            return Response(json.dumps({"detail": err.message}), status=err.status or 502,
                            mimetype="application/json")
        name = f"piescope-circuit-{circuit_id}-{key}" + (f"-prompt-{prompt}" if prompt is not None else "")
        return Response(json.dumps(data), mimetype="application/json",
                        headers={"Content-Disposition": f'inline; filename="{name}.json"'})
    return export


def _subgraph_route(client: ApiClient):
    def export(circuit_id: int, key: str) -> Response:
        prompt = request.args.get("prompt", type=int)
        nodes = [n for n in request.args.get("nodes", "").split(",") if n]
        try:
            data = client.subgraph(circuit_id, key, nodes, prompt)
        except ApiError as err:
            return Response(json.dumps({"detail": err.message}), status=err.status or 502,
                            mimetype="application/json")
        name = f"piescope-circuit-{circuit_id}-{key}-subgraph"
        return Response(json.dumps(data), mimetype="application/json",
                        headers={"Content-Disposition": f'inline; filename="{name}.json"'})
    return export


def create_dash_app(settings: Settings | None = None, *, client: ApiClient | None = None) -> dash.Dash:
    """The dashboard over the API at settings.api_url (`client` replaces the default client)."""
    settings = settings or Settings()
    client = client or ApiClient(settings.api_url, settings.api_token)
    app = dash.Dash(__name__, use_pages=True, pages_folder="", title="PIEscope",
                    suppress_callback_exceptions=True, update_title=None)
    app.server.config[CONFIG_KEY] = client
    _import_pages()
    app.layout = _shell()
    app.server.add_url_rule("/export/circuit/<int:circuit_id>/<key>.json", "export_graph", _export_route(client))
    app.server.add_url_rule("/export/subgraph/<int:circuit_id>/<key>.json", "export_subgraph", _subgraph_route(client))
    return app


def serve(settings: Settings, host: str | None = None, port: int | None = None, debug: bool = False) -> None:
    """Run the dashboard with Flask's server (one process, threaded)."""
    host = host or settings.dash_host
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving the dashboard on %s: anyone who can reach it can edit explanations and start jobs", host)
    create_dash_app(settings).run(host=host, port=port or settings.dash_port, debug=debug, use_reloader=False)
