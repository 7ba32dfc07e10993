"""A real stack for the CSI controller and identity tests.

Management (`management.app.create_app`) and a node-agent
(`node_agent.api.create_app`, without transports: the controller never
attaches on a node, and volume files need no root) are served by uvicorn on
unix sockets in threads; the CSI plugin is `csi_driver.server.build_server`
on its own socket. Tests talk to it with the same client the dev stack uses.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

pytest.importorskip("csi_driver._gen.csi_pb2", reason="CSI stubs not generated yet")

import uvicorn  # noqa: E402

from csi_driver.config import Mode, PluginConfig  # noqa: E402
from tessera.clients import ManagementClient  # noqa: E402
from tessera_dev.csi_client import CsiClient  # noqa: E402

TOKEN = "csi-test-token-0123456789"
GiB = 1024**3
MiB = 1024**2


@contextmanager
def serving(app: object, socket: Path) -> Iterator[None]:
    """uvicorn on a unix socket in a thread, for the duration of the block."""
    server = uvicorn.Server(uvicorn.Config(app, uds=str(socket), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"server on {socket} did not start")
        time.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # unix socket paths are limited to ~107 bytes; pytest's tmp_path can be longer
    path = Path(tempfile.mkdtemp(prefix="tcsi-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def management_url(tmp_path: Path, sock_dir: Path) -> Iterator[str]:
    try:
        from management.app import create_app
    except ImportError as exc:
        pytest.skip(f"management app not available yet: {exc}")
    app = create_app(f"sqlite:///{tmp_path / 'management.db'}", TOKEN)
    socket = sock_dir / "management.sock"
    with serving(app, socket):
        yield f"unix://{socket}"


@pytest.fixture
def agent_url(tmp_path: Path, sock_dir: Path) -> Iterator[str]:
    try:
        from node_agent.agent import Agent
        from node_agent.api import create_app
        from node_agent.pools import Pool
    except ImportError as exc:
        pytest.skip(f"node-agent not available yet: {exc}")
    pools = {}
    for name in ("p1", "p2"):
        (tmp_path / name).mkdir()
        pools[name] = Pool.open(name, tmp_path / name)
    agent = Agent(
        "n1", pools, dev_dir=tmp_path / "dev", transports={}, state_dir=tmp_path / "agent-state"
    )
    socket = sock_dir / "agent.sock"
    with serving(create_app(agent, TOKEN), socket):
        yield f"unix://{socket}"


@dataclass
class Stack:
    csi: CsiClient
    mgmt: ManagementClient
    endpoint: str


@pytest.fixture
def mgmt(management_url: str, agent_url: str) -> Iterator[ManagementClient]:
    """Management with two online nodes: n1 (10 GiB pool) and n2 (4 GiB pool).

    One agent serves both nodes' pools; management only needs its volume API.
    """
    client = ManagementClient(management_url, TOKEN)
    client.register_node("n1", agent_url, {"topology.tessera.io/node": "n1"})
    client.register_pool("n1", "p1", 10 * GiB)
    client.register_node("n2", agent_url, {"topology.tessera.io/node": "n2"})
    client.register_pool("n2", "p2", 4 * GiB)
    try:
        yield client
    finally:
        client.close()


def start_plugin(config: PluginConfig) -> tuple[grpc.Server, CsiClient]:
    from csi_driver.server import build_server

    server = build_server(config)
    server.start()
    return server, CsiClient(config.endpoint)


@pytest.fixture
def stack(mgmt: ManagementClient, management_url: str, sock_dir: Path) -> Iterator[Stack]:
    endpoint = f"unix://{sock_dir / 'csi.sock'}"
    config = PluginConfig(
        mode=Mode.CONTROLLER, endpoint=endpoint, management_url=management_url, token=TOKEN
    )
    server, client = start_plugin(config)
    try:
        yield Stack(csi=client, mgmt=mgmt, endpoint=endpoint)
    finally:
        client.close()
        server.stop(None).wait()


def code_of(call: object) -> tuple[grpc.StatusCode, str]:
    """Run a zero-argument call expected to fail; return its status code and message."""
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code(), info.value.details()
