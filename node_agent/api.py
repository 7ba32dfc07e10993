"""The node-agent's local HTTP API (served on a unix socket).

Exactly the table in docs/contracts.md. Errors leave as problem+json via
`tessera.errors.to_problem`, so clients rebuild the same error type.
Routes are plain `def`: they block on losetup and the filesystem, and
FastAPI runs them in its thread pool.
"""

from __future__ import annotations

import hmac
import logging
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from node_agent.agent import Agent
from tessera import __version__
from tessera.errors import (
    Internal,
    InvalidArgument,
    NotFound,
    TesseraError,
    Unauthenticated,
    to_problem,
)
from tessera.models import (
    AgentAttach,
    AgentAttachment,
    AgentVolume,
    AgentVolumeCreate,
    AgentVolumeResize,
)

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


def problem_response(err: TesseraError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(err, Unauthenticated) else None
    return JSONResponse(
        to_problem(err), status_code=err.http_status, media_type=PROBLEM_JSON, headers=headers
    )


def _bearer_checker(token: str):  # noqa: ANN202 - a FastAPI dependency
    expected = token.encode()

    def check(authorization: Annotated[str | None, Header()] = None) -> None:
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), expected):
            raise Unauthenticated("missing or wrong bearer token")

    return check


def _field_of(loc: tuple[object, ...]) -> str:
    """The user-facing name of a validation error location (drop body/path/query)."""
    parts = [str(p) for p in loc if p not in ("body", "path", "query", "header")]
    return ".".join(parts) or "body"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TesseraError)
    def tessera_error(_: Request, err: TesseraError) -> JSONResponse:
        return problem_response(err)

    @app.exception_handler(RequestValidationError)
    def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        field = _field_of(tuple(first.get("loc", ())))
        return problem_response(InvalidArgument(f"{field}: {first.get('msg')}", field=field))

    @app.exception_handler(StarletteHTTPException)
    def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 404:
            return problem_response(NotFound(f"no such endpoint: {err.detail}"))
        body = {"type": "about:blank", "title": str(err.detail), "status": err.status_code}
        return JSONResponse(body, status_code=err.status_code, media_type=PROBLEM_JSON)

    @app.exception_handler(Exception)
    def unexpected(_: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return problem_response(Internal(f"unexpected error: {type(err).__name__}: {err}"))


def create_app(agent: Agent, token: str) -> FastAPI:
    app = FastAPI(title="Tessera node-agent", version=__version__)
    _install_error_handlers(app)
    auth = [Depends(_bearer_checker(token))]

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.put("/v1/volumes/{volume_id}", dependencies=auth)
    def create_volume(volume_id: str, body: AgentVolumeCreate) -> AgentVolume:
        return agent.create_volume(volume_id, body.pool, body.size_bytes)

    @app.get("/v1/volumes/{volume_id}", dependencies=auth)
    def get_volume(volume_id: str) -> AgentVolume:
        return agent.get_volume(volume_id)

    @app.post("/v1/volumes/{volume_id}/resize", dependencies=auth)
    def resize_volume(volume_id: str, body: AgentVolumeResize) -> AgentVolume:
        return agent.resize_volume(volume_id, body.size_bytes)

    @app.delete("/v1/volumes/{volume_id}", status_code=204, dependencies=auth)
    def delete_volume(volume_id: str) -> Response:
        agent.delete_volume(volume_id)
        return Response(status_code=204)

    @app.put("/v1/attachments/{volume_id}", dependencies=auth)
    def attach(volume_id: str, body: AgentAttach) -> AgentAttachment:
        return agent.attach(volume_id, body.readonly)

    @app.get("/v1/attachments", dependencies=auth)
    def list_attachments() -> dict[str, list[AgentAttachment]]:
        return {"items": agent.list_attachments()}

    @app.get("/v1/attachments/{volume_id}", dependencies=auth)
    def get_attachment(volume_id: str) -> AgentAttachment:
        return agent.get_attachment(volume_id)

    @app.delete("/v1/attachments/{volume_id}", status_code=204, dependencies=auth)
    def detach(volume_id: str) -> Response:
        agent.detach(volume_id)
        return Response(status_code=204)

    return app
