"""Management's error responses: the shared problem+json handlers, plus the database.

Clients (`tessera.http.JsonClient`) rebuild the error type from the
problem document, so what we send is what the CSI driver reports to
Kubernetes; `tessera.rest` is where errors become responses.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError

from tessera.errors import Unavailable
from tessera.rest import install_problem_handlers, problem_response

log = logging.getLogger("management")


def install(app: FastAPI) -> None:
    """Register every exception handler on the app."""
    # every route reads or writes the database, which can be busy or gone: 503
    install_problem_handlers(app, log, "management", always=(503,))

    @app.exception_handler(OperationalError)
    def _database(_request: Request, exc: OperationalError) -> JSONResponse:
        log.error("database error: %s", exc)
        return problem_response(Unavailable("the database is busy or unreachable; retry"))
