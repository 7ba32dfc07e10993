"""Application factory: one engine, one agent-client cache, tables and the default vpg.

Everything expensive happens once here, never per request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import text

from management import problems
from management.agents import AgentClients
from management.context import DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_HEARTBEAT_MISSES, Context
from management.db import Database
from management.inventory import ensure_default_vpg
from management.metrics import InventoryCollector
from management.routes import health, v1_router
from tessera.errors import Unavailable
from tessera.http import Service
from tessera.observability.metrics import install_http_observability
from tessera.rest import BearerAuth, announce_service


def create_app(
    db_url: str,
    token: str,
    *,
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
    heartbeat_misses: int = DEFAULT_HEARTBEAT_MISSES,
    ca_file: str | None = None,
) -> FastAPI:
    """Build the management API.

    One bearer token serves both directions (clients to management, management
    to agents): an agent checks callers against the one token it also uses to
    register, so a separate agent token could never be accepted. Per-node
    credentials come with agents that listen on the network.
    """
    if not token:
        raise ValueError("an API token is required")
    db = Database(db_url)
    db.create_tables()
    ctx = Context(
        db=db,
        agents=AgentClients(token, ca_file),
        heartbeat_interval=heartbeat_interval,
        heartbeat_misses=heartbeat_misses,
    )
    ensure_default_vpg(ctx)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        ctx.agents.close()
        db.dispose()

    app = FastAPI(
        title="Tessera management",
        version="1",
        description="Storage control plane: nodes, pools, vpgs, volumes, attachments.",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    problems.install(app)
    app.include_router(health)
    add_readyz(app, db)
    app.add_middleware(BearerAuth, token=token)
    app.include_router(v1_router(ctx))
    announce_service(app, Service.MANAGEMENT)
    install_http_observability(app, "management", InventoryCollector(ctx))
    return app


def add_readyz(app: FastAPI, db: Database) -> None:
    """GET /readyz: 200 when the database answers, else 503 (no token: probes have none).

    Plain `def` (a worker thread): the query blocks. /healthz only says the
    process serves; a probe that sends traffic here should wait for both.
    """

    @app.get("/readyz", tags=["health"])
    def readyz() -> dict[str, str]:
        try:
            with db.read() as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:  # any driver error: not ready, and say which
            raise Unavailable(f"the database does not answer: {type(exc).__name__}") from exc
        return {"status": "ok"}
