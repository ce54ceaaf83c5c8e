"""The OpenAPI spec as the app behaves: auth on writes only, every error status it answers.

FastAPI's generated spec is completed here, operation by operation:
- writes (POST, PATCH, DELETE) declare bearer auth (PIESCOPE_API_TOKEN, required when the server
  has one) and 401 and 413; reads declare no security;
- every operation can answer 400 (a Host outside PIESCOPE_ALLOWED_HOSTS, a bad request), one
  with parameters or a body 422, one with a path id 404; routes declare their own extra codes
  (404 for names, 409 for conflicts) with `errors(...)`;
- every 4xx is the `ErrorOut` body the app sends (FastAPI's own 422 shape is not used).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from backend.api.schemas import ErrorOut

BEARER = "bearerToken"
WRITES = ("post", "put", "patch", "delete")
DESCRIPTIONS = {
    400: "Bad request: a Host outside PIESCOPE_ALLOWED_HOSTS, or a request the store cannot serve",
    401: "The server has PIESCOPE_API_TOKEN and this write did not carry it as a bearer token",
    404: "No such record or name",
    409: "The request conflicts with the record's state",
    413: "The request body is over the size limit",
    422: "Invalid request: the fields and what is wrong with each",
}
ERROR_REF = {"$ref": "#/components/schemas/ErrorOut"}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a route that answers these error codes (each an ErrorOut)."""
    return {code: {"model": ErrorOut, "description": DESCRIPTIONS[code]} for code in codes}


def _error_response(code: int) -> dict[str, Any]:
    return {"description": DESCRIPTIONS[code], "content": {"application/json": {"schema": ERROR_REF}}}


def complete_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Add security and error responses to FastAPI's generated `spec` (in place; returned)."""
    components = spec.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    error_schema = ErrorOut.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in error_schema.pop("$defs", {}).items():
        schemas[name] = sub
    schemas["ErrorOut"] = error_schema
    components["securitySchemes"] = {BEARER: {
        "type": "http", "scheme": "bearer",
        "description": "PIESCOPE_API_TOKEN: required on writes when the server has one; reads are open"}}
    for path_item in spec.get("paths", {}).values():
        for method, operation in path_item.items():
            if method not in WRITES + ("get", "head", "options"):
                continue
            responses = operation.setdefault("responses", {})
            codes = {400}
            parameters = operation.get("parameters", [])
            if parameters or "requestBody" in operation:
                codes.add(422)
            if any(p.get("in") == "path" for p in parameters):
                codes.add(404)
            if method in WRITES:
                codes |= {401, 413}
                operation["security"] = [{BEARER: []}]
            for code in codes:
                responses[str(code)] = _error_response(code)
            for code, response in responses.items():  # route-declared errors: the same body
                if code.startswith("4"):
                    responses[code] = _error_response(int(code)) if int(code) in DESCRIPTIONS else response
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return spec


def install(app: FastAPI) -> None:
    """Serve the completed spec at /openapi.json (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete_spec(get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
