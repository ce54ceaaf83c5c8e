"""`piescope serve`, `piescope dash` and `piescope demo`: the worker, the dashboard, the main job."""

from __future__ import annotations

import argparse

from backend.settings import Settings


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the worker's HTTP API (OpenAPI docs at /docs)")
    p.add_argument("--host", help="address to bind (default PIESCOPE_API_HOST, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default PIESCOPE_API_PORT, 8000)")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("dash", help="run the dashboard (Dash) over the worker API at PIESCOPE_API_URL")
    p.add_argument("--host", help="address to bind (default PIESCOPE_DASH_HOST, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default PIESCOPE_DASH_PORT, 8050)")
    p.add_argument("--api-url", help="the worker API (default PIESCOPE_API_URL, http://127.0.0.1:8000)")
    p.add_argument("--debug", action="store_true", help="Dash dev tools (no reloader)")
    p.set_defaults(run=cmd_dash)

    p = sub.add_parser("demo", help="the main job: demo model, its CLT, a stored sweep, worker and dashboard")
    p.add_argument("-n", type=int, default=20, help="IOI prompts to show")
    p.add_argument("--no-serve", action="store_true",
                   help="only prepare the model and its CLT; start no servers")
    p.set_defaults(run=cmd_demo)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> None:
    from backend.api.app import serve
    serve(settings, host=args.host, port=args.port)


def cmd_dash(args: argparse.Namespace, settings: Settings) -> None:
    from frontend_dash.app import serve
    if args.api_url:
        settings = settings.model_copy(update={"api_url": args.api_url})
    serve(settings, host=args.host, port=args.port, debug=args.debug)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> None:
    from backend.demo import run_demo
    run_demo(settings, n=args.n, serve=not args.no_serve)
