"""The FastAPI application: `create_app(settings)`; `serve(settings)` runs it with uvicorn.

Start-up takes the store's single-worker lock (`backend.store.lock`), then upgrades the store
to the newest migration, marks jobs a dead process left behind as failed, and starts the job
executor: a second worker on the same store refuses before touching anything. `serve` also
binds its port before any of that, and refuses to listen beyond loopback without a token.
Every request passes the guard (`backend.api.guard`: Host allow-list, size, strict JSON); every
error is an `ErrorOut` without server paths. OpenAPI docs are at /docs.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from backend.api import openapi
from backend.api.cache import ResponseCache, keep_confirmed
from backend.api.deps import require_write_token
from backend.api.guard import RequestGuard
from backend.api.jobs import PIE_KINDS, JobExecutor, JobKind
from backend.api.redact import redact
from backend.api.routers import dashboard, edges, features, graphs, hierarchies, interp, jobs, meta, overview, results
from backend.errors import UserError
from backend.settings import LOOPBACK_HOSTS, Settings
from backend.store.db import open_store
from backend.store.lock import StoreLock
from backend.store.tables import Circuit

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # 1 MiB; create_app(max_body_bytes=...) overrides it
MAX_ERRORS_IN_DETAIL = 5


def check_token(settings: Settings) -> None:
    """An empty PIESCOPE_API_TOKEN is a mistake, never a silent 'no authentication'."""
    if settings.api_token is not None and not settings.api_token.strip():
        raise UserError("PIESCOPE_API_TOKEN is set but empty: set a real token, or unset it to serve "
                        "without one on loopback")


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings, host: str) -> None:
    """Listening beyond loopback needs a token: anyone who can reach the port could start jobs."""
    check_token(settings)
    if not is_loopback(host) and not settings.api_token:
        raise UserError(f"serving on {host} (beyond loopback) needs PIESCOPE_API_TOKEN: anyone who can "
                        "reach the port could start jobs; set a token or serve on 127.0.0.1")
    if not is_loopback(host) and settings.allowed_host_names <= set(LOOPBACK_HOSTS):
        log.warning("serving on %s, but only Host names %s are answered: set PIESCOPE_ALLOWED_HOSTS to the "
                    "names clients use", host, ", ".join(sorted(settings.allowed_host_names)))


# ------------------------------------------------------------------------------ error answers

def _field_path(loc: tuple) -> list[str | int]:
    """A pydantic error location, without the tag a discriminated job union adds after 'body'."""
    parts = list(loc)
    if len(parts) > 2 and parts[0] == "body" and parts[1] in PIE_KINDS and parts[2] == "params":
        del parts[1]
    return parts


def _message(error: dict) -> str:
    if error["type"] == "union_tag_invalid":
        ctx = error.get("ctx", {})
        return f"unknown job kind {ctx.get('tag')!r}; known kinds: {', '.join(PIE_KINDS)}"
    if error["type"] == "union_tag_not_found":
        return f"the job's kind is missing; known kinds: {', '.join(PIE_KINDS)}"
    return error["msg"].removeprefix("Value error, ")


async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    """422 with one line naming each invalid field, and the fields as a list."""
    fields = []
    for e in err.errors():
        loc = _field_path(e.get("loc", ()))
        if e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc = [*loc, "kind"]
        fields.append({"loc": loc, "msg": _message(e), "type": e["type"]})
    where = [".".join(str(p) for p in f["loc"][1:]) or str(f["loc"][0] if f["loc"] else "request") for f in fields]
    lines = [f"{w}: {f['msg']}" for w, f in zip(where, fields)][:MAX_ERRORS_IN_DETAIL]
    if len(fields) > MAX_ERRORS_IN_DETAIL:
        lines.append(f"and {len(fields) - MAX_ERRORS_IN_DETAIL} more")
    return JSONResponse({"detail": "; ".join(lines) or "invalid request", "errors": fields}, status_code=422)


async def _user_error(request: Request, err: UserError) -> JSONResponse:
    return JSONResponse({"detail": redact(str(err), request.app.state.settings), "errors": []},
                        status_code=err.http_status)


# ------------------------------------------------------------------------------ the app

def create_app(settings: Settings | None = None, *, max_body_bytes: int = MAX_BODY_BYTES,
               job_kinds: dict[str, JobKind] | None = None, store_lock: StoreLock | None = None) -> FastAPI:
    """The PIEscope API over the store and models of `settings`.

    job_kinds replaces the executor's kinds (prune, sweep, graph...) — for executor tests only.
    store_lock: the store's lock, already held (by `serve`); else start-up takes it.
    """
    settings = settings or Settings()
    check_token(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lock = store_lock if store_lock is not None else StoreLock(settings.database_url).acquire()
        try:
            engine, sessions = open_store(settings)
            executor = JobExecutor(settings, sessions, kinds=job_kinds)
            executor.start()
            app.state.sessions, app.state.executor, app.state.engine = sessions, executor, engine
            # Everything allocated at start-up (torch, transformers, the app) lives for the whole
            # process; keeping it out of the cyclic GC turns 100+ ms full collections into short ones.
            gc.freeze()
            refresher = asyncio.create_task(keep_confirmed(app.state.circuit_cache, engine))
            log.info("PIEscope API ready (store: %s)", engine.url.render_as_string(hide_password=True))
            try:
                yield
            finally:
                refresher.cancel()
                executor.stop()
                engine.dispose()
        finally:
            if store_lock is None:
                lock.release()

    app = FastAPI(title="PIEscope", version="0.1.0", lifespan=lifespan,
                  description="Find, explain and check circuits in language models. Reads are open; "
                              "writes need `Authorization: Bearer <PIESCOPE_API_TOKEN>` when the server has one.",
                  dependencies=[Depends(require_write_token)])
    app.state.settings = settings
    app.state.circuit_cache = ResponseCache(Circuit)
    app.state.max_body_bytes = max_body_bytes
    app.add_middleware(RequestGuard, max_bytes=max_body_bytes, allowed_hosts=settings.allowed_host_names,
                       per_path={"/api/graphs/import": max(max_body_bytes, graphs.MAX_GRAPH_BODY_BYTES)})
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(UserError, _user_error)
    for module in (meta, jobs, results, edges, graphs, hierarchies, features, interp, dashboard, overview):
        app.include_router(module.router)
    openapi.install(app)
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free one), or one UserError line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port}: {err}") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err} (is another server using it?)") from None
    return sock


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """Run the API with uvicorn on settings.api_host:api_port (127.0.0.1:8000 by default).

    In this order, each refusing with one line (UserError) before anything is changed: the
    token rules, the store's lock, the port. Then start-up migrates and recovers the store.
    """
    import uvicorn
    host = host or settings.api_host
    port = settings.api_port if port is None else port
    check_exposure(settings, host)
    with StoreLock(settings.database_url) as lock:
        sock = bind_socket(host, port)
        config = uvicorn.Config(create_app(settings, store_lock=lock), host=host, port=port, log_level="info")
        uvicorn.Server(config).run(sockets=[sock])
