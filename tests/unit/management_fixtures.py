"""Fixtures for the management tests: a real app on SQLite and on PostgreSQL, and a real agent.

`FakeAgent` is a small but real agent-compatible HTTP server (uvicorn on a
unix socket, in a thread) that implements the volume part of the agent API
with real sparse files, and the export and key routes of docs/data-path.md
as records (the real node-agent's exports were being built alongside
management's side of the contract; these keep to the same routes and
bodies). It can be told to fail, to exercise management's retry convergence.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.testclient import TestClient

from management.app import create_app
from tessera.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TesseraError,
    Unauthenticated,
    Unavailable,
    to_problem,
)
from tessera.http import Service
from tessera.models import (
    AgentAttach,
    AgentAttachment,
    AgentExport,
    AgentExportCreate,
    AgentKey,
    AgentVolume,
    AgentVolumeCreate,
    AgentVolumeResize,
    Connection,
    Transport,
)
from tessera.nvme_names import subsystem_nqn
from tessera.rest import announce_service
from tests.postgresql import PostgresServer, running_server

TOKEN = "test-token-0123456789"
GiB = 1024**3
MiB = 1024**2


@dataclass
class FakeAgent:
    """Agent volume API over real sparse files; `fail` holds operations to answer 503."""

    root: Path
    socket: Path
    token: str = TOKEN
    fail: set[str] = field(default_factory=set)
    calls: list[tuple[str, str]] = field(default_factory=list)
    #: open exports: (volume id, client node) -> what management asked for
    exports: dict[tuple[str, str], AgentExportCreate] = field(default_factory=dict)
    ports: dict[tuple[str, str], int] = field(default_factory=dict)
    #: keys this node holds for remote volumes
    keys: dict[str, AgentKey] = field(default_factory=dict)
    #: run when an operation arrives, before it is carried out (to interleave other calls)
    hooks: dict[str, Callable[[], object]] = field(default_factory=dict)
    #: one create at a time, as the real agent's per-volume lock does: two replicas may
    #: drive the same create at once, and a file seen between open and truncate is no answer
    create_lock: threading.Lock = field(default_factory=threading.Lock)
    #: the node it serves (names its nvmet subsystems, as nvme_names.subsystem_nqn does)
    node_id: str = "fake"
    #: consumer side: the connection each attached volume was last given, and the
    #: condition its data path reports (what the composed transport would say)
    attached: dict[str, AgentAttach] = field(default_factory=dict)
    conditions: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def path(self, pool: str, volume_id: str) -> Path:
        return self.root / pool / "volumes" / f"{volume_id}.img"

    def find(self, volume_id: str) -> Path | None:
        hits = list(self.root.glob(f"*/volumes/{volume_id}.img"))
        return hits[0] if hits else None

    def _volume(self, path: Path) -> AgentVolume:
        st = path.stat()
        return AgentVolume(
            id=path.stem, pool=path.parent.parent.name, size_bytes=st.st_size, path=str(path),
            allocated_bytes=st.st_blocks * 512,
        )  # fmt: skip

    def _attachment(self, volume_id: str) -> AgentAttachment:
        body = self.attached[volume_id]
        return AgentAttachment(
            volume_id=volume_id,
            device=f"/dev/tessera/{volume_id}",
            backing_device="/dev/md127",
            transport=body.connection.transport.value if body.connection else "loop",
            readonly=body.readonly,
            size_bytes=body.connection.data_bytes if body.connection else 0,
            condition=self.conditions.get(volume_id, ""),
            connection=body.connection or Connection(),
        )

    def app(self) -> FastAPI:
        app = FastAPI()
        announce_service(app, Service.NODE_AGENT)  # management refuses answers without it

        @app.exception_handler(TesseraError)
        def _problem(_r: Request, exc: TesseraError) -> JSONResponse:
            return JSONResponse(
                to_problem(exc), status_code=exc.http_status, media_type="application/problem+json"
            )

        def guard(request: Request, op: str, volume_id: str) -> None:
            if request.headers.get("authorization") != f"Bearer {self.token}":
                raise Unauthenticated("bad token")
            self.calls.append((op, volume_id))
            if op in self.hooks:
                self.hooks.pop(op)()
            if op in self.fail:
                raise Unavailable(f"injected failure of {op}")

        @app.put("/v1/volumes/{volume_id}")
        def create(request: Request, volume_id: str, body: AgentVolumeCreate) -> AgentVolume:
            guard(request, "create", volume_id)
            path = self.path(body.pool, volume_id)
            with self.create_lock:
                if path.exists() and path.stat().st_size != body.size_bytes:
                    raise AlreadyExists("same id, other size", field="size_bytes")
                path.parent.mkdir(parents=True, exist_ok=True)
                if body.source is not None and not path.exists():  # a clone: its data first
                    kind = "snapshots" if body.source.kind == "snapshot" else "volumes"
                    source = self.root / body.pool / kind / f"{body.source.id}.img"
                    if not source.exists():
                        raise NotFound(f"no {body.source.kind} {body.source.id}")
                    shutil.copyfile(source, path)
                with open(path, "ab") as f:
                    f.truncate(body.size_bytes)
            return AgentVolume(
                id=volume_id, pool=body.pool, size_bytes=body.size_bytes, path=str(path)
            )

        @app.get("/v1/volumes")
        def list_volumes(request: Request) -> dict[str, list[AgentVolume]]:
            guard(request, "list_volumes", "")
            return {"items": [self._volume(p) for p in sorted(self.root.glob("*/volumes/*.img"))]}

        @app.get("/v1/attachments")
        def list_attachments(request: Request) -> dict[str, list[AgentAttachment]]:
            guard(request, "list_attachments", "")
            return {"items": [self._attachment(v) for v in sorted(self.attached)]}

        @app.post("/v1/volumes/{volume_id}/resize")
        def resize(request: Request, volume_id: str, body: AgentVolumeResize) -> AgentVolume:
            guard(request, "resize", volume_id)
            path = self.find(volume_id)
            if path is None:
                raise NotFound("no such volume")
            if body.size_bytes > path.stat().st_size:
                os.truncate(path, body.size_bytes)
            pool = path.parent.parent.name
            return AgentVolume(
                id=volume_id, pool=pool, size_bytes=path.stat().st_size, path=str(path)
            )

        @app.delete("/v1/volumes/{volume_id}")
        def delete(request: Request, volume_id: str) -> Response:
            guard(request, "delete", volume_id)
            # the real agent refuses too: a file in use may hold the only current copy
            if volume_id in self.attached:
                raise FailedPrecondition(f"volume {volume_id} is attached on this node")
            exported = sorted(c for v, c in self.exports if v == volume_id)
            if exported:
                raise FailedPrecondition(f"volume {volume_id} is exported to {exported}")
            path = self.find(volume_id)
            if path is not None:
                path.unlink()
            return Response(status_code=204)

        self._export_routes(app, guard)
        return app

    def _export_routes(self, app: FastAPI, guard: Callable[[Request, str, str], None]) -> None:
        """Owner and consumer routes of docs/data-path.md "Keys (TLS-PSK)"."""

        @app.put("/v1/exports/{volume_id}/{client_node}")
        def export(
            request: Request, volume_id: str, client_node: str, body: AgentExportCreate
        ) -> AgentExport:
            guard(request, "export", f"{volume_id}/{client_node}")
            key = (volume_id, client_node)
            nvme = body.transport == Transport.NVME_TCP
            if nvme and body.readonly:  # nvmet has no per-host read-only (the contract)
                raise InvalidArgument("nvme-tcp exports are read-write", field="readonly")
            if self.exports.get(key) != body:  # another key or flags replace the export
                self.ports[key] = 10809 + len(self.ports)
            self.exports[key] = body
            return AgentExport(
                volume_id=volume_id,
                client_node=client_node,
                host="192.0.2.1",
                port=4420 if nvme else self.ports[key],
                readonly=body.readonly,
                transport=body.transport,
                subsystem_nqn=subsystem_nqn(volume_id, self.node_id) if nvme else "",
            )

        @app.delete("/v1/exports/{volume_id}/{client_node}")
        def close_export(request: Request, volume_id: str, client_node: str) -> Response:
            guard(request, "close_export", f"{volume_id}/{client_node}")
            self.exports.pop((volume_id, client_node), None)
            return Response(status_code=204)

        @app.put("/v1/keys/{volume_id}")
        def put_key(request: Request, volume_id: str, body: AgentKey) -> Response:
            guard(request, "put_key", volume_id)
            self.keys[volume_id] = body
            return Response(status_code=204)

        @app.put("/v1/attachments/{volume_id}")
        def attach(request: Request, volume_id: str, body: AgentAttach) -> AgentAttachment:
            guard(request, "attach", volume_id)
            self.attached[volume_id] = body
            return self._attachment(volume_id)

        @app.get("/v1/attachments/{volume_id}")
        def get_attachment(request: Request, volume_id: str) -> AgentAttachment:
            guard(request, "get_attachment", volume_id)
            if volume_id not in self.attached:
                raise NotFound(f"volume {volume_id} is not attached here")
            return self._attachment(volume_id)

        @app.delete("/v1/keys/{volume_id}")
        def delete_key(request: Request, volume_id: str) -> Response:
            guard(request, "delete_key", volume_id)
            self.keys.pop(volume_id, None)
            return Response(status_code=204)


def serve_agent(agent: FakeAgent) -> Iterator[FakeAgent]:
    """Run the agent's uvicorn server in a thread for as long as the generator lives."""
    config = uvicorn.Config(agent.app(), uds=str(agent.socket), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("fake agent did not start")
        time.sleep(0.01)
    try:
        yield agent
    finally:
        server.should_exit = True
        thread.join(timeout=10)


#: serve_agent as a context manager, for an ExitStack of several agents
served_agent = contextmanager(serve_agent)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[FakeAgent]:
    # unix socket paths are limited to ~107 bytes; tmp_path can be long
    sock_dir = Path(tempfile.mkdtemp(prefix="tsa-"))
    try:
        yield from serve_agent(FakeAgent(root=tmp_path / "pools", socket=sock_dir / "agent.sock"))
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the whole session (see tests/postgresql.py)."""
    with running_server() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Every management test runs on both databases management supports.

    SQLite: a file in the test's directory. PostgreSQL: a fresh schema on
    the session's real server, dropped after the test.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'management.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    with server.schema() as url:
        yield url


@pytest.fixture
def api(db_url: str) -> Iterator[TestClient]:
    """An authenticated client of a fresh management app (no nodes yet)."""
    app = create_app(db_url, TOKEN)
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


@pytest.fixture
def cluster(api: TestClient, agent: FakeAgent) -> TestClient:
    """Two online nodes served by the agent: n1 with a 10 GiB pool, n2 with a 4 GiB pool."""
    add_node(api, "n1", agent.url, {"p1": 10 * GiB})
    add_node(api, "n2", agent.url, {"p2": 4 * GiB})
    return api


def add_node(
    api: TestClient, node_id: str, agent_url: str, pools: dict[str, int], max_volumes: int = 0
) -> None:
    body = {"agent_url": agent_url, "topology": {"zone": "a"}, "max_volumes": max_volumes}
    assert api.put(f"/v1/nodes/{node_id}", json=body).status_code == 200
    for name, capacity in pools.items():
        resp = api.put(f"/v1/nodes/{node_id}/pools/{name}", json={"capacity_bytes": capacity})
        assert resp.status_code == 200, resp.text


def create(api: TestClient, name: str, size: int, **extra: object) -> dict:
    resp = api.post("/v1/volumes", json={"name": name, "size_bytes": size, **extra})
    assert resp.status_code in (200, 201), resp.text
    return resp.json()


def is_problem(resp: object) -> bool:
    return resp.headers["content-type"].startswith("application/problem+json")  # type: ignore[attr-defined]
