"""FastAPI dependencies: settings, a database session, the executor, and the write token."""

from __future__ import annotations

import hmac
from collections.abc import Iterator

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from backend.api.jobs import JobExecutor
from backend.settings import Settings

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_bearer = HTTPBearer(auto_error=False, description="PIESCOPE_API_TOKEN; required for writes when set")


# Cheap dependencies are async: a sync one would cost a threadpool hop on every request.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """A session per request; write endpoints commit explicitly, anything else rolls back."""
    with request.app.state.sessions() as session:
        yield session


async def get_executor(request: Request) -> JobExecutor:
    return request.app.state.executor


async def require_write_token(request: Request,
                        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """Writes need `Authorization: Bearer <token>` when PIESCOPE_API_TOKEN is set (401 otherwise)."""
    token = request.app.state.settings.api_token
    if not token or request.method not in WRITE_METHODS:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "this write needs 'Authorization: Bearer <token>' "
                            "with the server's PIESCOPE_API_TOKEN", headers={"WWW-Authenticate": "Bearer"})
