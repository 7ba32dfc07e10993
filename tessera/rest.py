"""Server-side REST plumbing shared by management and the node-agent.

The one place errors become HTTP responses (always application/problem+json,
which `tessera.http.JsonClient` turns back into the same error type), the
bearer-token check, the header naming the service on every answer, and the
JSON answer helper. Both services are FastAPI apps; what is here keeps them
answering alike.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tessera.errors import (
    PROBLEM_JSON,
    Internal,
    InvalidArgument,
    Misconfigured,
    NoSuchRoute,
    TesseraError,
    Unauthenticated,
    to_problem,
)
from tessera.http import SERVICE_HEADER, Service
from tessera.models import FORM_RULES

#: pydantic error types rewritten into something a user can act on
_MESSAGES = {
    "missing": "is required",
    "extra_forbidden": "is not a known field (check the spelling)",
    "model_attributes_type": "must be a JSON object",
    "dict_type": "must be a JSON object",
    "model_type": "must be a JSON object",
}


def server_options(access_log: bool) -> dict[str, Any]:
    """uvicorn settings both REST services share.

    No per-request lines unless asked for (the services log what they did,
    with the volume it concerned); no proxy-header rewriting, Server or Date
    headers: peers are Tessera's own clients, and each is work on every call.
    """
    return {
        "access_log": access_log,
        "proxy_headers": False,
        "server_header": False,
        "date_header": False,
    }


def json_response(model: BaseModel, status_code: int = 200) -> Response:
    """A model as JSON, serialized by pydantic in one pass.

    Routes still declare `response_model` for the OpenAPI document, but
    returning a ready Response skips FastAPI's second validation and
    generic encoding of a model we built ourselves: a measurable share of
    every volume create.
    """
    return Response(model.model_dump_json(), status_code, media_type="application/json")


def problem_response(
    err: TesseraError, extra: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = to_problem(err)
    if extra:
        body.update(extra)
    if isinstance(err, Unauthenticated):
        headers = {"WWW-Authenticate": "Bearer", **(headers or {})}
    return JSONResponse(body, status_code=err.http_status, media_type=PROBLEM_JSON, headers=headers)


# ---- validation errors -------------------------------------------------------------


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
    if kind == "string_pattern_mismatch":
        return FORM_RULES.get((error.get("ctx") or {}).get("pattern", ""), "has the wrong form")
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
    if len(detail) > 1900:  # many bad items: the first ones, and where the rest are
        kept = detail[:1900].rpartition("; ")[0] or detail[:1900]
        detail = f"{kept}; ... ({len(items)} problems in all: see `errors`)"
    err = InvalidArgument(detail, field=items[0]["field"] if items else None)
    return problem_response(err, {"errors": items})


def _malformed_json(errors: list[dict[str, Any]]) -> JSONResponse:
    ctx = next((e.get("ctx") or {} for e in errors if e.get("type") == "json_invalid"), {})
    why = ctx.get("error")
    detail = "request body is not valid JSON" + (f": {why}" if why else "")
    body = to_problem(InvalidArgument(detail))
    body.update(status=400, title="malformed request")
    return JSONResponse(body, status_code=400, media_type=PROBLEM_JSON)


def http_problem(request: Request, exc: StarletteHTTPException, service: str) -> JSONResponse:
    """Framework errors in our format; an unknown route or method is `no-such-route`.

    Routing's 404 and 405 say nothing about any resource: they mean the
    caller's URL (prefix, version) or method is wrong. Their own problem
    type keeps clients from reading them as `not-found`, which would let a
    delete answer "already gone" while the volume stays.
    """
    if exc.status_code in (404, 405):
        err: TesseraError = NoSuchRoute(
            f"{service} has no route {request.method} {request.url.path[:200]}: check the URL, "
            "its path prefix and that client and server versions match"
        )
        err.http_status = exc.status_code
    elif exc.status_code >= 500:
        err = Internal(str(exc.detail))
    else:
        err = InvalidArgument(str(exc.detail))
        err.http_status = exc.status_code
    return problem_response(err, headers=getattr(exc, "headers", None))


def install_problem_handlers(
    app: FastAPI, log: logging.Logger, service: str, *, always: tuple[int, ...] = ()
) -> None:
    """Register the exception handlers every Tessera REST service shares.

    Unexpected exceptions are logged with their traceback and answered with
    a generic 500 that points at `service`'s log and never leaks internals.
    The OpenAPI document declares the problem+json answers (see
    `document_problems`); `always` are statuses any of the service's
    operations can answer (management: 503 when the database is busy).
    """
    document_problems(app, always)
    # "/v1/volumes/" is not "/v1/volumes": answer no-such-route instead of a
    # redirect our clients do not follow and that lands on another operation
    app.router.redirect_slashes = False
    # routes added from here on refuse query parameters they do not declare
    app.router.dependencies.append(Depends(known_query_only))

    @app.exception_handler(TesseraError)
    def _tessera(_request: Request, exc: TesseraError) -> JSONResponse:
        if exc.http_status >= 500:
            log.warning("%s: %s", exc.kind, exc.message)
        return problem_response(exc)

    @app.exception_handler(RequestValidationError)
    def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_problem(exc)

    @app.exception_handler(StarletteHTTPException)
    def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return http_problem(request, exc, service)

    @app.exception_handler(Exception)
    def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return problem_response(Internal(f"internal error; the {service} log has the details"))


async def known_query_only(request: Request) -> None:
    """Refuse query parameters the route does not declare, as Strict models refuse fields.

    `async def`: it runs for every route, /healthz too, and a plain `def`
    dependency would need a worker thread, queueing health checks behind
    work (docs/contracts.md, "Locks and timeouts").

    `?max_entrie=5` silently ignored would answer a different question than
    the one asked; a typo must get a 422 that names it.
    """
    dependant = getattr(request.scope.get("route"), "dependant", None)
    known = _query_names(dependant) if dependant is not None else set()
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        names = ", ".join(repr(name[:40]) for name in unknown[:5])
        raise InvalidArgument(
            f"unknown query parameter {names} (check the spelling)", field=unknown[0][:80]
        )


def _query_names(dependant: Any) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


# ---- the OpenAPI document -----------------------------------------------------------


class ProblemItem(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    """RFC 9457 problem document: the body of every 4xx and 5xx answer."""

    type: str = Field(
        pattern="^https://tessera\\.io/problems/[a-z-]+$",
        description="https://tessera.io/problems/<kind>; only not-found means the resource "
        "does not exist (no-such-route: wrong URL, prefix, version or method)",
    )
    title: str = Field(min_length=1)
    status: int = Field(ge=400, le=599)
    detail: str = Field(
        min_length=1, description="what is wrong, in a sentence a person can act on"
    )
    field: str | None = Field(default=None, description="the request field at fault, if one is")
    errors: list[ProblemItem] | None = Field(
        default=None, description="every invalid field (validation errors only)"
    )


_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
_DESCRIPTIONS = {
    400: "malformed request: the body is not valid JSON",
    401: "unauthenticated: missing or wrong bearer token",
    404: "not-found: the resource does not exist; no-such-route: no such route (check the URL)",
    405: "no-such-route: the path exists, the method does not (a path value that names another "
    "route)",
    409: "already-exists, conflict, failed-precondition or aborted: the current state forbids it",
    421: "misconfigured: the request's Tessera-Service header names another service; not run",
    422: "invalid-argument or out-of-range: `field` names the input at fault",
    500: "internal: a bug; the service's log has the details",
    502: "misconfigured: an upstream service does not serve the API at its URL",
    503: "unavailable: the database or an upstream service cannot be reached; retry",
    504: "outcome-unknown: an upstream service did not answer; retrying is safe",
    507: "resource-exhausted: no pool has room, or a node is at its volume limit",
}


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: the problem+json answers it can give besides the common ones.

    The common ones (400 with a body, 401 under /v1, 404 with path parameters,
    422 with any input, 500) are added to every operation by `document_problems`.
    """
    return {status: {"description": _DESCRIPTIONS[status]} for status in statuses}


def document_problems(app: FastAPI, always: tuple[int, ...] = (), auth_prefix: str = "/v1") -> None:
    """Make the app's OpenAPI document say what the service really answers.

    FastAPI documents a 422 with its own validation schema as
    application/json; ours are problem+json, as are all 4xx/5xx, and /v1 needs
    the bearer token. Contract tests (schemathesis) check answers against this.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        doc = generate()
        components = doc.setdefault("components", {})
        if "Problem" not in components.setdefault("schemas", {}):
            _add_problems(doc, always, auth_prefix)
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def _add_problems(doc: dict[str, Any], always: tuple[int, ...], auth_prefix: str) -> None:
    schemas = doc["components"]["schemas"]
    problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(problem.pop("$defs", {}))
    schemas["Problem"] = problem
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    bearer = {"type": "http", "scheme": "bearer"}
    doc["components"].setdefault("securitySchemes", {})["bearer"] = bearer
    for path, operations in doc["paths"].items():
        for op in operations.values():
            statuses = {500, *always, *_common_statuses(op)}
            if path.startswith(auth_prefix):
                statuses.add(401)
                op["security"] = [{"bearer": []}]
            responses = op.setdefault("responses", {})
            for status in statuses:
                responses.setdefault(str(status), {"description": _DESCRIPTIONS[status]})
            for code, response in responses.items():
                if code.isdigit() and int(code) >= 400:
                    response["description"] = _DESCRIPTIONS.get(int(code), response["description"])
                    response["content"] = {PROBLEM_JSON: {"schema": _PROBLEM_REF}}


def _common_statuses(op: dict[str, Any]) -> set[int]:
    params = op.get("parameters", [])
    statuses = set()
    if params or "requestBody" in op:
        statuses.add(422)
    if "requestBody" in op:
        statuses.add(400)
    if any(p.get("in") == "path" for p in params):
        # no such item; or a value that makes the path another route's ('a/b': 404,
        # POST /v1/volumes/{volume_id}/expand with volume_id 'expand': 405)
        statuses |= {404, 405}
    return statuses


# ---- authentication ----------------------------------------------------------------


class BearerAuth:
    """ASGI middleware: every path under `prefix` needs `Authorization: Bearer <token>`.

    A middleware rather than a FastAPI dependency: it runs before routing and
    body parsing, costs one header lookup per request, and cannot be left
    off a route by mistake. Constant-time comparison (hmac.compare_digest),
    so response timing says nothing about how much of a guess was right.
    """

    def __init__(self, app: ASGIApp, token: str, prefix: str = "/v1") -> None:
        if not token:
            raise ValueError("a bearer token is required")
        self.app = app
        self._expected = token.encode()
        self._prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self._prefix):
            refusal = self._refusal(dict(scope["headers"]).get(b"authorization", b""))
            if refusal is not None:
                await problem_response(refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, header: bytes) -> Unauthenticated | None:
        scheme, _, presented = header.partition(b" ")
        if scheme.lower() != b"bearer" or not presented.strip():
            return Unauthenticated("missing bearer token: send 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(presented.strip(), self._expected):
            return Unauthenticated("invalid bearer token")
        return None


# ---- which service answered --------------------------------------------------------


class ServiceHeader:
    """ASGI middleware: every answer says which Tessera service sent it (SERVICE_HEADER).

    Management and the node-agent serve the same paths and take the same
    token; without this a client pointed at the wrong socket gets answers
    that look right, and a DeleteVolume sent to the agent unlinks the file.
    Both directions: `tessera.http.JsonClient` names the service it means
    in the same header, and a request meant for another service is refused
    here (421 Misdirected Request) before it reaches a route - checking the
    answer alone would come after the agent had deleted the file. The
    client also refuses any answer that does not name the service it
    expects. Requests without the header (curl, other tools) are served.
    """

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self._name = Service(service).value.encode()
        self._header = (SERVICE_HEADER.lower().encode(), self._name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), self._header]
            await send(message)

        meant = dict(scope["headers"]).get(self._header[0])
        if meant is not None and meant.strip().lower() != self._name:
            await problem_response(self._misdirected(meant))(scope, receive, send_named)
            return
        await self.app(scope, receive, send_named)

    def _misdirected(self, meant: bytes) -> Misconfigured:
        err = Misconfigured(
            f"this is the {self._name.decode()}, not {meant[:40].decode(errors='replace')!r}: "
            "the request was sent to the wrong URL and was not run"
        )
        err.http_status = 421
        return err


def announce_service(app: FastAPI, service: Service) -> None:
    """Wrap the app's whole middleware stack in `ServiceHeader`.

    Outside every other layer, Starlette's own error middleware included
    (its 500 answers bypass middlewares added with `add_middleware`), and
    independent of the order in which the app adds its middlewares: no
    answer, 401, 404 or 500, leaves without the header.
    """
    build = app.build_middleware_stack

    def build_named() -> ASGIApp:
        return ServiceHeader(build(), service)

    app.build_middleware_stack = build_named  # type: ignore[method-assign]
