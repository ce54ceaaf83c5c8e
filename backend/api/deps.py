"""FastAPI dependencies: settings, read and write sessions, the executor, and the write token."""

from __future__ import annotations

import hmac
from collections.abc import Iterator

from fastapi import HTTPException, Request, status
from sqlalchemy.orm import Session

from backend.api.jobs import JobExecutor
from backend.settings import Settings
from backend.store.db import write_session

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


# Cheap dependencies are async: a sync one would cost a threadpool hop on every request.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """A read session per request (rolled back at the end)."""
    with request.app.state.sessions() as session:
        yield session


def get_write_session(request: Request) -> Iterator[Session]:
    """A writer's session per request: the endpoint commits explicitly, anything else rolls back."""
    with write_session(request.app.state.sessions) as session:
        yield session


async def get_executor(request: Request) -> JobExecutor:
    return request.app.state.executor


async def require_write_token(request: Request) -> None:
    """Writes need `Authorization: Bearer <token>` when PIESCOPE_API_TOKEN is set (401 otherwise).

    Reads are open by design. The header is read here rather than through FastAPI's security
    classes so that the OpenAPI spec declares bearer auth on writes only (`backend.api.openapi`).
    """
    token = request.app.state.settings.api_token
    if not token or request.method not in WRITE_METHODS:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "this write needs 'Authorization: Bearer <token>' "
                            "with the server's PIESCOPE_API_TOKEN", headers={"WWW-Authenticate": "Bearer"})
