"""Prometheus metrics of the three processes (names fixed by the issue 9 contract).

The request metrics live in prometheus-client's default registry, next to
its process_* metrics. What is collected at scrape time from a database or
the kernel (management's inventory, the agent's data path) comes from a
collector the app passes to `install_http_observability`; it is served on
that app's /metrics only, never registered globally, so two apps in one
process (tests) never clash.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response as FastAPIResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.registry import Collector, CollectorRegistry
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tessera.observability.logs import request_id_from, request_scope

access = logging.getLogger("tessera.access")
# no *_created series: a second timestamp per labelled child that no dashboard uses
disable_created_metrics()
log = logging.getLogger(__name__)

#: latency buckets (seconds): sub-millisecond REST lookups up to minute-long stages
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

CSI_RPC_DURATION = Histogram(
    "tessera_csi_rpc_duration_seconds",
    "Time to answer a CSI RPC, by method (every status code)",
    ["method"],
    buckets=BUCKETS,
)
CSI_RPCS = Counter(
    "tessera_csi_rpcs",  # exposed as tessera_csi_rpcs_total
    "CSI RPCs answered, by method and gRPC status code (OK included)",
    ["method", "code"],
)
HTTP_REQUEST_DURATION = Histogram(
    "tessera_http_request_duration_seconds",
    "Time to answer a REST request, by process, route template and method",
    ["process", "route", "method"],
    buckets=BUCKETS,
)
HTTP_REQUESTS = Counter(
    "tessera_http_requests",  # exposed as tessera_http_requests_total
    "REST requests answered, by process, route template, method and HTTP status",
    ["process", "route", "method", "status"],
)

#: the route label of a request no route matches (never the raw path: unbounded cardinality)
UNMATCHED = "unmatched"
#: probes and scrapes come every few seconds: their access lines are DEBUG, not INFO
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
REQUEST_ID_HEADER = b"x-request-id"

#: every metric name the code registers (the dashboard test checks against it)
NAMES = frozenset(
    {
        "tessera_csi_rpc_duration_seconds",
        "tessera_csi_rpcs_total",
        "tessera_http_request_duration_seconds",
        "tessera_http_requests_total",
        "tessera_pool_capacity_bytes",
        "tessera_pool_allocated_bytes",
        "tessera_volumes",
        "tessera_attachments",
        "tessera_nodes",
        "tessera_datapath_processes",
        "tessera_attachments_local",
    }
)


def exposition(extra: Collector | None = None) -> bytes:
    """The default registry (process_*, requests, RPCs), then `extra`'s metrics."""
    text = generate_latest(REGISTRY)
    if extra is not None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(extra)
        text += generate_latest(registry)
    return text


# ---- CSI -----------------------------------------------------------------------------


def record_rpc(method: str, code: str, seconds: float) -> None:
    CSI_RPC_DURATION.labels(method).observe(seconds)
    CSI_RPCS.labels(method, code).inc()


class _MetricsHandler(BaseHTTPRequestHandler):
    """GET /metrics and /healthz; nothing else (the CSI plugin has no other HTTP)."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._answer(200, exposition(), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._answer(200, b'{"status":"ok"}\n', "application/json")
        else:
            self._answer(404, b"only /metrics and /healthz\n", "text/plain")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Scrapes every few seconds are not worth a line each."""


def parse_host_port(text: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:PORT`, `:PORT` = every address) of --metrics-listen."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a scrape in progress never holds the plugin's exit


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """/metrics and /healthz over plain HTTP on a daemon thread (the CSI plugin's)."""

    def __init__(self, host: str, port: int) -> None:
        server_class = _Server6 if ":" in host else _Server
        self._server = server_class((host, port), _MetricsHandler)
        self.address: tuple[str, int] = self._server.server_address[:2]  # type: ignore[assignment]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# ---- REST services ---------------------------------------------------------------------


class RouteTemplates:
    """Which route template a request is for, without running the app's routing.

    For requests refused before routing (401, 421). Built once, lazily,
    from the OpenAPI document (every documented route, prefixes included)
    and the top-level routes it leaves out (/metrics): FastAPI's own route
    tree is not a stable interface.
    """

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self._compiled: list[tuple[re.Pattern[str], frozenset[str], str]] | None = None

    def _build(self) -> list[tuple[re.Pattern[str], frozenset[str], str]]:
        paths: dict[str, set[str]] = {}
        for template, operations in self.app.openapi().get("paths", {}).items():
            paths.setdefault(template, set()).update(m.upper() for m in operations)
        for route in self.app.router.routes:
            if isinstance(getattr(route, "path", None), str):
                paths.setdefault(route.path, set()).update(getattr(route, "methods", None) or ())
        return [(compile_path(t)[0], frozenset(m), t) for t, m in paths.items()]

    def match(self, path: str, method: str) -> tuple[str, dict[str, Any]]:
        """(template, path parameters); a path without any route is UNMATCHED."""
        if self._compiled is None:
            self._compiled = self._build()
        fallback: tuple[str, dict[str, Any]] = (UNMATCHED, {})
        for regex, methods, template in self._compiled:
            found = regex.match(path)
            if found is None:
                continue
            if method in methods or (method == "HEAD" and "GET" in methods):
                return template, found.groupdict()
            if fallback[0] == UNMATCHED:
                fallback = (template, found.groupdict())  # the path exists, the method does not
        return fallback


def _route_of(templates: RouteTemplates, scope: Scope) -> tuple[str, dict[str, Any]]:
    """The matched route's template and path parameters, never the raw path.

    Routing has set `scope["route"]` when the request got that far.
    """
    route = scope.get("route")
    if route is not None and isinstance(getattr(route, "path", None), str):
        return route.path, scope.get("path_params") or {}
    return templates.match(scope["path"], scope["method"])


class Observe:
    """ASGI middleware outside every other: request id, metrics, one access line.

    Outermost (like tessera.rest.ServiceHeader) so that 401, 421 and 500
    answers are counted and logged like any other.
    """

    def __init__(self, app: ASGIApp, templates: RouteTemplates, process: str) -> None:
        self.app = app
        self.templates = templates
        self.process = process

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(dict(scope["headers"]).get(REQUEST_ID_HEADER))
        header = (REQUEST_ID_HEADER, request_id.encode())
        status = 500  # an exception that escapes every handler ends as a 500

        async def send_tagged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        started = time.perf_counter()
        try:
            with request_scope(request_id):
                await self.app(scope, receive, send_tagged)
        finally:
            self._record(scope, status, time.perf_counter() - started, request_id)

    def _record(self, scope: Scope, status: int, seconds: float, request_id: str) -> None:
        route, params = _route_of(self.templates, scope)
        method = scope["method"]
        HTTP_REQUEST_DURATION.labels(self.process, route, method).observe(seconds)
        HTTP_REQUESTS.labels(self.process, route, method, str(status)).inc()
        fields = {
            "request_id": request_id,
            "route": route,
            "method": method,
            "status": status,
            "duration_ms": round(seconds * 1000, 1),
        }
        for name in ("volume_id", "node_id"):
            if isinstance(params.get(name), str):
                fields[name] = params[name]
        level = logging.DEBUG if route in QUIET_ROUTES and status < 400 else logging.INFO
        access.log(
            level, "%s %s %d %.1fms", method, route, status, fields["duration_ms"], extra=fields
        )


def install_http_observability(
    app: FastAPI, process: str, collector: Collector | None = None
) -> None:
    """GET /metrics (no token: outside /v1), and `Observe` around the whole app.

    Call after `tessera.rest.announce_service`, so `Observe` is outermost.
    `collector` adds metrics gathered at scrape time (DB counts, processes).
    """

    # plain `def`: the collector blocks on the database or /proc (FastAPI's threadpool)
    @app.get("/metrics", include_in_schema=False)
    def metrics() -> FastAPIResponse:
        return FastAPIResponse(exposition(collector), media_type=CONTENT_TYPE_LATEST)

    build = app.build_middleware_stack
    templates = RouteTemplates(app)

    def build_observed() -> ASGIApp:
        return Observe(build(), templates, process)

    app.build_middleware_stack = build_observed  # type: ignore[method-assign]
