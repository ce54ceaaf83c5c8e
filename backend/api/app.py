"""The FastAPI application: `create_app(settings)`; `serve(settings)` runs it with uvicorn.

Start-up upgrades the store to the newest migration, marks jobs a dead process left behind as
failed, and starts the job executor. OpenAPI docs are at /docs.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.api.cache import ResponseCache
from backend.api.deps import require_write_token
from backend.api.jobs import JobExecutor, JobKind
from backend.api.routers import dashboard, features, edges, graphs, hierarchies, interp, jobs, meta, results
from backend.errors import UserError
from backend.settings import Settings
from backend.store.db import open_store

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # 1 MiB; create_app(max_body_bytes=...) overrides it


class BodyLimitMiddleware:
    """Answer 413 to any request body over `max_bytes` (by Content-Length, or counted while read).

    The body is buffered (it is at most `max_bytes`) and replayed to the app, so an oversized
    chunked upload is refused before any endpoint sees it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, per_path: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.per_path = per_path or {}  # routes that take larger bodies (graph files)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope.get("path", ""), self.max_bytes)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, limit)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(scope, receive, send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        response = JSONResponse({"detail": f"request body over the limit of {limit} bytes"},
                                status_code=413)
        await response(scope, receive, send)


async def _user_error(request: Request, err: UserError) -> JSONResponse:
    return JSONResponse({"detail": str(err)}, status_code=err.http_status)


def create_app(settings: Settings | None = None, *, max_body_bytes: int = MAX_BODY_BYTES,
               job_kinds: dict[str, JobKind] | None = None) -> FastAPI:
    """The PIEscope API over the store and models of `settings`.

    job_kinds replaces the executor's kinds (prune, sweep, graph) — for executor tests only.
    """
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine, sessions = open_store(settings)
        executor = JobExecutor(settings, sessions, kinds=job_kinds)
        executor.start()
        app.state.sessions, app.state.executor, app.state.engine = sessions, executor, engine
        # Everything allocated at start-up (torch, transformers, the app) lives for the whole
        # process; keeping it out of the cyclic GC turns 100+ ms full collections into short ones.
        gc.freeze()
        log.info("PIEscope API ready (store: %s)", engine.url.render_as_string(hide_password=True))
        try:
            yield
        finally:
            executor.stop()
            engine.dispose()

    app = FastAPI(title="PIEscope", version="0.1.0", lifespan=lifespan,
                  description="Find, explain and check circuits in language models.",
                  dependencies=[Depends(require_write_token)])
    app.state.settings = settings
    app.state.circuit_cache = ResponseCache()
    app.state.max_body_bytes = max_body_bytes
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes,
                       per_path={"/api/graphs/import": max(max_body_bytes, graphs.MAX_GRAPH_BODY_BYTES)})
    app.add_exception_handler(UserError, _user_error)
    for module in (meta, jobs, results, edges, graphs, hierarchies, features, interp, dashboard):
        app.include_router(module.router)
    return app


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """Run the API with uvicorn on settings.api_host:api_port (127.0.0.1:8000 by default)."""
    import uvicorn
    host = host or settings.api_host
    if host not in ("127.0.0.1", "localhost", "::1") and not settings.api_token:
        log.warning("serving on %s without PIESCOPE_API_TOKEN: anyone who can reach it can start jobs", host)
    uvicorn.run(create_app(settings), host=host, port=port or settings.api_port, log_level="info")
