"""The CSI Identity service, the plugin's socket and its command line."""

# The shared fixtures are imported by name, so parameters that use them look
# like redefinitions to ruff.
# ruff: noqa: F811

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

pytest.importorskip("csi_driver._gen.csi_pb2", reason="CSI stubs not generated yet")

import tessera  # noqa: E402
from csi_driver.__main__ import config_from_args, parse_args  # noqa: E402
from csi_driver._gen import csi_pb2, csi_pb2_grpc  # noqa: E402
from csi_driver.config import Mode, PluginConfig  # noqa: E402
from csi_driver.identity import IdentityServicer  # noqa: E402
from csi_driver.interceptor import ErrorMappingInterceptor  # noqa: E402
from csi_driver.server import build_server, socket_path  # noqa: E402
from tessera.clients import AgentClient, ManagementClient  # noqa: E402
from tessera.models import AgentNode, Registration  # noqa: E402
from tessera_dev.csi_client import CsiClient  # noqa: E402
from tests.unit.test_csi_controller_fixtures import (  # noqa: F401 - fixtures
    TOKEN,
    Stack,
    agent_url,
    code_of,
    management_url,
    mgmt,
    serving,
    sock_dir,
    stack,
    start_plugin,
)

_Service = csi_pb2.PluginCapability.Service
_Expansion = csi_pb2.PluginCapability.VolumeExpansion


def _capabilities(client: CsiClient) -> list[str]:
    resp = client.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    out = []
    for cap in resp.capabilities:
        if cap.HasField("service"):
            out.append(_Service.Type.Name(cap.service.type))
        else:
            out.append("expansion " + _Expansion.Type.Name(cap.volume_expansion.type))
    return out


def _probe(client: CsiClient) -> csi_pb2.ProbeResponse:
    return client.identity.Probe(csi_pb2.ProbeRequest())


class identity_only:
    """An Identity service alone (e.g. for node mode while node.py is elsewhere)."""

    def __init__(self, sock_dir: Path, config: PluginConfig, checks: list) -> None:
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=2), interceptors=[ErrorMappingInterceptor()]
        )
        csi_pb2_grpc.add_IdentityServicer_to_server(IdentityServicer(config, checks), self.server)
        self.server.add_insecure_port(f"unix:{sock_dir / 'id.sock'}")
        self.client = CsiClient(f"unix://{sock_dir / 'id.sock'}")

    def __enter__(self) -> CsiClient:
        self.server.start()
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.server.stop(None).wait()


# ---- Identity ---------------------------------------------------------------------------


def test_plugin_introduces_itself_as_csi_tessera_io_with_its_version(stack: Stack) -> None:
    info = stack.csi.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "csi.tessera.io"
    assert info.vendor_version == tessera.__version__


def test_plugin_advertises_controller_topology_and_online_expansion(stack: Stack) -> None:
    assert _capabilities(stack.csi) == [
        "CONTROLLER_SERVICE",
        "VOLUME_ACCESSIBILITY_CONSTRAINTS",
        "expansion ONLINE",
        "GROUP_CONTROLLER_SERVICE",
        "SNAPSHOT_METADATA_SERVICE",
    ]


def test_node_mode_reports_the_same_plugin_capabilities(sock_dir: Path) -> None:
    # CSI: every instance of one version SHALL return the same set, whatever it serves
    config = PluginConfig(mode=Mode.NODE, endpoint="unix:///unused", node_id="n1")
    with identity_only(sock_dir, config, []) as client:
        assert _capabilities(client) == [
            "CONTROLLER_SERVICE",
            "VOLUME_ACCESSIBILITY_CONSTRAINTS",
            "expansion ONLINE",
            "GROUP_CONTROLLER_SERVICE",
            "SNAPSHOT_METADATA_SERVICE",
        ]


def test_probe_is_ready_when_management_answers(stack: Stack) -> None:
    resp = _probe(stack.csi)
    assert resp.HasField("ready") and resp.ready.value is True


def test_probe_says_not_ready_instead_of_failing_while_management_is_down(
    sock_dir: Path,
) -> None:
    config = PluginConfig(
        mode=Mode.CONTROLLER,
        endpoint=f"unix://{sock_dir / 'csi.sock'}",
        management_url=f"unix://{sock_dir / 'nobody-here.sock'}",
        token=TOKEN,
    )
    server, client = start_plugin(config)
    try:
        resp = _probe(client)
        assert resp.HasField("ready") and resp.ready.value is False
    finally:
        client.close()
        server.stop(None).wait()


def test_node_probe_is_not_ready_while_no_agent_answers(sock_dir: Path) -> None:
    config = PluginConfig(mode=Mode.NODE, endpoint="unix:///unused", node_id="n1")
    down = AgentClient(f"unix://{sock_dir / 'no-agent.sock'}", TOKEN)
    with identity_only(sock_dir, config, [("node-agent", down.registered)]) as client:
        assert _probe(client).ready.value is False


# ---- Probe over time: ready once the peers were, then about this process only ----------------


def _ready(client: CsiClient) -> bool:
    resp = _probe(client)
    assert resp.HasField("ready"), "Probe must say whether it is ready"
    return resp.ready.value


def _eventually_ready(client: CsiClient, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not _ready(client):
        assert time.monotonic() < deadline, "Probe never became ready"
        time.sleep(0.05)


@contextmanager
def _management(tmp_path: Path, socket: Path) -> Iterator[ManagementClient]:
    """Management served on `socket` until the block ends (an outage, when it does)."""
    from management.app import create_app

    app = create_app(f"sqlite:///{tmp_path / 'management.db'}", TOKEN)
    with serving(app, socket):
        client = ManagementClient(f"unix://{socket}", TOKEN)
        try:
            yield client
        finally:
            client.close()


class _Node:
    """A real agent app (pools in tmp_path) with a real Registrar, served on a socket."""

    def __init__(self, tmp_path: Path, sock_dir: Path) -> None:
        from node_agent.__main__ import registration_of
        from node_agent.agent import Agent
        from node_agent.api import create_app
        from node_agent.pools import Pool
        from node_agent.registration import Registrar

        (tmp_path / "p1").mkdir()
        self.agent = Agent("n1", {"p1": Pool.open("p1", tmp_path / "p1")},
                           dev_dir=tmp_path / "dev", transports={})  # fmt: skip
        self.socket = sock_dir / "agent.sock"
        self.url = f"unix://{self.socket}"
        management = ManagementClient(f"unix://{sock_dir / 'management.sock'}", TOKEN)
        self.registrar = Registrar(management, "n1", self.url, self.agent.pool_capacities)
        self.app = create_app(self.agent, TOKEN, registration_of(self.registrar))


def test_agent_says_whether_management_knows_its_node_and_pools(
    tmp_path: Path, sock_dir: Path
) -> None:
    from node_agent.api import create_app

    node = _Node(tmp_path, sock_dir)
    agent = AgentClient(node.url, TOKEN)
    with serving(node.app, node.socket):
        assert agent.node().registration == Registration.PENDING
        assert agent.registered() is False
        with _management(tmp_path, sock_dir / "management.sock") as mgmt:
            node.registrar.start()
            try:
                assert node.registrar.registered.wait(30)
                assert agent.node() == AgentNode(node_id="n1", registration=Registration.REGISTERED)
                assert {p.name for p in mgmt.list_pools().items if p.node_id == "n1"} == {"p1"}
            finally:
                node.registrar.stop()
    local_only = create_app(node.agent, TOKEN)  # tessera-node-agent --no-register
    with serving(local_only, node.socket):
        assert agent.node().registration == Registration.DISABLED
        assert agent.registered() is True, "nothing to wait for when the agent never registers"
    agent.close()


def test_node_probe_is_ready_only_once_management_registered_the_node_and_its_pools(
    tmp_path: Path, sock_dir: Path
) -> None:
    node = _Node(tmp_path, sock_dir)
    config = PluginConfig(
        mode=Mode.NODE,
        endpoint=f"unix://{sock_dir / 'csi.sock'}",
        node_id="n1",
        token=TOKEN,
        agent_url=node.url,
    )
    server, client = start_plugin(config)
    try:
        assert _ready(client) is False, "no agent answers yet"
        with serving(node.app, node.socket):
            assert _ready(client) is False, "the agent answers, but management does not know it"
            with _management(tmp_path, sock_dir / "management.sock") as mgmt:
                node.registrar.start()
                _eventually_ready(client)
                assert {p.name for p in mgmt.list_pools().items if p.node_id == "n1"} == {"p1"}
            node.registrar.stop()
            # management is gone: the node plugin stays ready (a restart fixes nothing)
            assert _ready(client) is True
        # and so is the agent: still ready, and calls that need it say UNAVAILABLE
        assert _ready(client) is True
        code, details = code_of(
            lambda: client.node.NodeGetVolumeStats(
                csi_pb2.NodeGetVolumeStatsRequest(
                    volume_id="vol-0123456789abcdef0123456789abcdef", volume_path=str(sock_dir)
                )
            )
        )
        assert code == grpc.StatusCode.UNAVAILABLE, details
    finally:
        client.close()
        server.stop(None).wait()


def test_controller_probe_stays_ready_through_a_management_outage(
    tmp_path: Path, sock_dir: Path
) -> None:
    socket = sock_dir / "management.sock"
    server, client = start_plugin(_controller_config(sock_dir, f"unix://{socket}"))
    try:
        assert _ready(client) is False, "management has never answered"
        with _management(tmp_path, socket):
            _eventually_ready(client)
        assert _ready(client) is True, "a management outage must not restart the plugin"
        code, details = code_of(
            lambda: client.controller.CreateVolume(
                csi_pb2.CreateVolumeRequest(
                    name="during-the-outage",
                    capacity_range=csi_pb2.CapacityRange(required_bytes=1 << 20),
                    volume_capabilities=[
                        csi_pb2.VolumeCapability(
                            mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
                            access_mode=csi_pb2.VolumeCapability.AccessMode(mode=1),
                        )
                    ],
                )
            )
        )
        assert code == grpc.StatusCode.UNAVAILABLE, details
        assert "management" in details.lower(), details
    finally:
        client.close()
        server.stop(None).wait()


def test_controller_mode_does_not_serve_node_calls(stack: Stack) -> None:
    code, _ = code_of(lambda: stack.csi.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest()))
    assert code == grpc.StatusCode.UNIMPLEMENTED


# ---- the socket ----------------------------------------------------------------------------


def test_plugin_socket_is_private_to_its_owner(stack: Stack) -> None:
    mode = socket_path(stack.endpoint).stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


@pytest.mark.parametrize(
    ("endpoint", "path"),
    [("unix:///run/csi/csi.sock", "/run/csi/csi.sock"), ("unix:/run/csi.sock", "/run/csi.sock")],
)
def test_endpoint_forms_kubernetes_uses_are_understood(endpoint: str, path: str) -> None:
    assert socket_path(endpoint) == Path(path)


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:10000", "/run/csi.sock", "unix://rel.sock"])
def test_endpoints_that_are_not_absolute_unix_sockets_are_refused(endpoint: str) -> None:
    with pytest.raises(ValueError, match="unix:///"):
        socket_path(endpoint)


def _controller_config(sock_dir: Path, management_url: str = "unix:///nowhere") -> PluginConfig:
    return PluginConfig(
        mode=Mode.CONTROLLER,
        endpoint=f"unix://{sock_dir / 'csi.sock'}",
        management_url=management_url,
        token=TOKEN,
    )


def test_a_socket_left_by_a_crashed_plugin_is_replaced(sock_dir: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_dir / "csi.sock"))
    stale.close()  # the file stays, nobody listens: what a SIGKILL leaves behind
    server, client = start_plugin(_controller_config(sock_dir))
    try:
        info = client.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
        assert info.name == "csi.tessera.io"
    finally:
        client.close()
        server.stop(None).wait()


def test_a_regular_file_at_the_socket_path_is_never_deleted(sock_dir: Path) -> None:
    precious = sock_dir / "csi.sock"
    precious.write_text("not a socket")
    with pytest.raises(RuntimeError, match="not a socket"):
        build_server(_controller_config(sock_dir))
    assert precious.read_text() == "not a socket"


# ---- command line ----------------------------------------------------------------------------


@pytest.fixture
def token_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    os.chmod(path, 0o600)
    yield path


def test_command_line_builds_the_plugin_config(token_file: Path) -> None:
    args = parse_args(
        [
            "--mode=all",
            "--endpoint=unix:///run/csi.sock",
            "--node-id=n1",
            "--management=unix:///run/management.sock",
            f"--token-file={token_file}",
            "--agent-socket=/run/agent.sock",
            "--max-volumes-per-node=8",
            "--zone=z1",
        ]
    )
    config = config_from_args(args)
    assert config == PluginConfig(
        mode=Mode.ALL,
        endpoint="unix:///run/csi.sock",
        node_id="n1",
        management_url="unix:///run/management.sock",
        token=TOKEN,
        agent_url="unix:///run/agent.sock",
        max_volumes_per_node=8,
        zone="z1",
    )


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--mode=controller", "--endpoint=unix:///x", "--token-file=t"], "--management"),
        (
            ["--mode=node", "--endpoint=unix:///x", "--token-file=t", "--agent-socket=/a"],
            "--node-id",
        ),
        (
            ["--mode=node", "--endpoint=unix:///x", "--token-file=t", "--node-id=n"],
            "--agent-socket",
        ),
        (["--mode=controller", "--endpoint=unix:///x", "--management=http://m"], "--token-file"),
        (["--mode=sideways", "--endpoint=unix:///x"], "--mode"),
    ],
)
def test_command_line_says_which_option_is_missing(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    assert complaint in capsys.readouterr().err


def test_the_token_never_reaches_the_log(
    token_file: Path, sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    config = _controller_config(sock_dir)
    server, client = start_plugin(config)
    try:
        _probe(client)
        client.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    finally:
        client.close()
        server.stop(None).wait()
    assert TOKEN not in caplog.text
