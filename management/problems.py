"""The one place errors become HTTP responses: always application/problem+json.

Clients (`tessera.http.JsonClient`) rebuild the error type from the
problem document, so what we send here is what the CSI driver reports to
Kubernetes. Messages name the field and say what to change; unexpected
exceptions are logged here with their traceback and answered with a
generic 500 that never leaks internals.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tessera.errors import (
    PROBLEM_TYPE_PREFIX,
    Internal,
    InvalidArgument,
    TesseraError,
    Unauthenticated,
    Unavailable,
    to_problem,
)

log = logging.getLogger("management")

PROBLEM_JSON = "application/problem+json"

#: pydantic error types rewritten into something a user can act on
_MESSAGES = {
    "missing": "is required",
    "extra_forbidden": "is not a known field (check the spelling)",
    "model_attributes_type": "must be a JSON object",
    "dict_type": "must be a JSON object",
    "model_type": "must be a JSON object",
}


def problem_response(
    err: TesseraError, extra: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = to_problem(err)
    if extra:
        body.update(extra)
    if isinstance(err, Unauthenticated):
        headers = {"WWW-Authenticate": "Bearer", **(headers or {})}
    return JSONResponse(body, status_code=err.http_status, media_type=PROBLEM_JSON, headers=headers)


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or "body"


def _message(error: dict[str, Any]) -> str:
    kind = error.get("type", "")
    if kind == "model_attributes_type" and isinstance(error.get("input"), bytes | str):
        return "must be a JSON object (send it with Content-Type: application/json)"
    if kind in _MESSAGES:
        return _MESSAGES[kind]
    msg = str(error.get("msg", "is invalid"))
    for prefix, repl in (("Input should be", "must be"), ("Input should", "must")):
        if msg.startswith(prefix):
            return repl + msg[len(prefix) :]
    return msg[:1].lower() + msg[1:]


def validation_problem(exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        return _malformed_json(errors)
    items = [
        {"field": _field_name(tuple(e.get("loc", ()))), "message": _message(e)} for e in errors
    ]
    detail = "; ".join(f"{i['field']}: {i['message']}" for i in items)
    err = InvalidArgument(detail, field=items[0]["field"] if items else None)
    return problem_response(err, {"errors": items})


def _malformed_json(errors: list[dict[str, Any]]) -> JSONResponse:
    ctx = next((e.get("ctx") or {} for e in errors if e.get("type") == "json_invalid"), {})
    why = ctx.get("error")
    detail = "request body is not valid JSON" + (f": {why}" if why else "")
    body = to_problem(InvalidArgument(detail))
    body.update(status=400, title="malformed request")
    return JSONResponse(body, status_code=400, media_type=PROBLEM_JSON)


def http_problem(exc: StarletteHTTPException) -> JSONResponse:
    """Framework errors (unknown route, wrong method) in the same format as ours."""
    title = {404: "not found", 405: "method not allowed"}.get(exc.status_code, "http error")
    kind = title.replace(" ", "-")
    body = {
        "type": PROBLEM_TYPE_PREFIX + kind,
        "title": title,
        "status": exc.status_code,
        "detail": str(exc.detail),
    }
    return JSONResponse(
        body,
        status_code=exc.status_code,
        media_type=PROBLEM_JSON,
        headers=getattr(exc, "headers", None),
    )


def install(app: FastAPI) -> None:
    """Register every exception handler on the app."""

    @app.exception_handler(TesseraError)
    def _tessera(_request: Request, exc: TesseraError) -> JSONResponse:
        if exc.http_status >= 500:
            log.warning("%s: %s", exc.kind, exc.message)
        return problem_response(exc)

    @app.exception_handler(RequestValidationError)
    def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_problem(exc)

    @app.exception_handler(StarletteHTTPException)
    def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return http_problem(exc)

    @app.exception_handler(OperationalError)
    def _database(_request: Request, exc: OperationalError) -> JSONResponse:
        log.error("database error: %s", exc)
        return problem_response(Unavailable("the database is busy or unreachable; retry"))

    @app.exception_handler(Exception)
    def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return problem_response(Internal("internal error; the management log has the details"))
