"""The request guard: every request is checked here before any endpoint sees it.

- Host: the Host header must name one of PIESCOPE_ALLOWED_HOSTS (loopback names by default),
  so a page on another site cannot reach a loopback worker by DNS rebinding (400).
- Size: a body over `max_bytes` is refused, by Content-Length or counted while read (413).
- Text: JSON bodies are strict (RFC 8259 numbers only: no NaN or Infinity, nor a literal that
  overflows to one), and no string anywhere (body keys and values, query, path) may hold a lone
  surrogate or a NUL, which no backend can store as text (422).

The body is buffered (it is at most `max_bytes`) and replayed to the app.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

JSON_TYPES = ("application/json",)


class RequestGuard:
    """ASGI middleware implementing the checks above; errors are `ErrorOut` bodies."""

    def __init__(self, app: ASGIApp, max_bytes: int, allowed_hosts: Iterable[str],
                 per_path: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.allowed_hosts = frozenset(allowed_hosts)
        self.per_path = per_path or {}  # routes that take larger bodies (graph files)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        problem = self._host_problem(headers.get(b"host", b"").decode("latin-1"))
        if problem:
            await _refuse(scope, receive, send, 400, problem, "host_not_allowed", ["header", "host"])
            return
        bad = _bad_query_or_path(scope)
        if bad:
            await _refuse(scope, receive, send, 422, bad[1], "string_invalid", bad[0])
            return
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope.get("path", ""), self.max_bytes)
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._too_large(scope, receive, send, limit)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._too_large(scope, receive, send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and _is_json(headers.get(b"content-type")):
            problem = strict_json_problem(body)
            if problem:
                await _refuse(scope, receive, send, 422, f"body: {problem}", "json_invalid", ["body"])
                return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _host_problem(self, host: str) -> str | None:
        if "*" in self.allowed_hosts:
            return None
        name = host_name(host)
        if name in self.allowed_hosts:
            return None
        return (f"this worker does not answer for Host '{name[:100]}'; it answers "
                f"{', '.join(sorted(self.allowed_hosts))} (PIESCOPE_ALLOWED_HOSTS)")

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        await _refuse(scope, receive, send, 413, f"request body over the limit of {limit} bytes",
                      "body_too_large", ["body"])


def host_name(host: str) -> str:
    """The name part of a Host header, lower case: 'LocalHost:8000' -> 'localhost', '[::1]:80' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def _is_json(content_type: bytes | None) -> bool:
    """As FastAPI decides: no Content-Type, application/json or application/*+json is JSON."""
    if not content_type:
        return True
    kind = content_type.decode("latin-1").split(";", 1)[0].strip().lower()
    return kind in JSON_TYPES or (kind.startswith("application/") and kind.endswith("+json"))


class _NotStrict(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NotStrict(f"{name} is not a JSON number; send finite numbers only")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotStrict(f"the number {text[:40]} overflows a double; send finite numbers only")
    return value


def strict_json_problem(body: bytes) -> str | None:
    """Why `body` is not strict JSON with storable text, or None when it is."""
    try:
        value = json.loads(body, parse_constant=_reject_constant, parse_float=_finite)
    except _NotStrict as err:
        return str(err)
    except RecursionError:
        return "JSON nested too deeply"
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, too many digits
        return f"not valid JSON ({str(err)[:200]})"
    stack = [value]
    while stack:  # iterative: a deep document must not exhaust the Python stack
        item = stack.pop()
        if isinstance(item, str):
            problem = text_problem(item)
            if problem:
                return problem
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
    return None


def text_problem(text: str) -> str | None:
    """Why `text` cannot be stored as text (a NUL, a lone surrogate), or None."""
    if "\x00" in text:
        return "text must not contain NUL (\\u0000) characters"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "text must be valid Unicode (a lone surrogate such as \\ud800 is not)"
    return None


def _bad_query_or_path(scope: Scope) -> tuple[list[str], str] | None:
    problem = text_problem(scope.get("path", ""))
    if problem:
        return ["path"], f"path: {problem}"
    query = scope.get("query_string", b"")
    if query:
        for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            problem = text_problem(key) or text_problem(value)
            if problem:
                return ["query", key[:100]], f"query.{key[:100]}: {problem}"
    return None


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, detail: str, kind: str,
                  loc: list[str]) -> None:
    body = {"detail": detail, "errors": [{"loc": loc, "msg": detail, "type": kind}] if status == 422 else []}
    await JSONResponse(body, status_code=status)(scope, receive, send)
