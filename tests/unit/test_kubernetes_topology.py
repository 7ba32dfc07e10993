"""`tessera-csi --kubernetes-topology`: NodeGetInfo's zone and region from the Kubernetes Node.

A real HTTP server on 127.0.0.1 stands in for the API server (GET
/api/v1/nodes/<name> answers a Node object as JSON, or a Status), the real
`kubernetes` client reaches it through a kubeconfig file, and NodeGetInfo
runs over the plugin's real gRPC socket, so the codes are what the
node-driver-registrar sees.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest

pytest.importorskip("csi_driver._gen.csi_pb2", reason="CSI stubs not generated yet")

from csi_driver.__main__ import parse_args  # noqa: E402
from csi_driver._gen import csi_pb2  # noqa: E402
from csi_driver.config import Mode, PluginConfig  # noqa: E402
from csi_driver.kubernetes_topology import (  # noqa: E402
    REGION_KEY,
    KubernetesConfigError,
    NodeTopology,
)
from csi_driver.server import build_server  # noqa: E402
from tessera.errors import Unavailable  # noqa: E402
from tessera.topology import TOPOLOGY_KEY, ZONE_KEY  # noqa: E402
from tessera_dev.csi_client import CsiClient  # noqa: E402

API_TOKEN = "k8s-sa-token-0123456789"


@dataclass
class FakeApiServer:
    """Node objects by name; `status` forces every answer (e.g. 403); `requests` is what came."""

    nodes: dict[str, dict[str, str]] = field(default_factory=dict)
    status: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0
    #: serve https with this context (the in-cluster path verifies the CA)
    tls: ssl.SSLContext | None = None
    _server: ThreadingHTTPServer | None = None

    def start(self) -> FakeApiServer:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                api.requests.append((self.path, self.headers.get("Authorization", "")))
                name = self.path.split("?")[0].removeprefix("/api/v1/nodes/")
                if api.status:
                    self._answer(api.status, _status(api.status))
                elif self.path.startswith("/api/v1/nodes/") and name in api.nodes:
                    node = {
                        "apiVersion": "v1",
                        "kind": "Node",
                        "metadata": {"name": name, "labels": api.nodes[name]},
                    }
                    self._answer(200, node)
                else:
                    self._answer(404, _status(404))

            def _answer(self, code: int, body: dict[str, object]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _status(code: int) -> dict[str, object]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code}


def write_kubeconfig(path: Path, port: int) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "t", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "t", "user": {"token": API_TOKEN}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}],
        "current-context": "t",
    }
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


@pytest.fixture
def apiserver() -> Iterator[FakeApiServer]:
    server = FakeApiServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def kubeconfig(apiserver: FakeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = write_kubeconfig(tmp_path / "kubeconfig", apiserver.port)
    monkeypatch.setenv("KUBECONFIG", str(path))
    return path


@pytest.fixture
def plugin(kubeconfig: Path) -> Iterator[CsiClient]:
    """A node plugin named `worker-1` with --kubernetes-topology, on a real socket."""
    sock_dir = Path(tempfile.mkdtemp(prefix="tk8s-"))
    config = PluginConfig(
        mode=Mode.NODE,
        endpoint=f"unix://{sock_dir / 'csi.sock'}",
        node_id="worker-1",
        agent_url=f"unix://{sock_dir / 'no-agent.sock'}",  # NodeGetInfo never asks the agent
        token="t0ken",
        kubernetes_topology=True,
    )
    server = build_server(config)
    server.start()
    client = CsiClient(config.endpoint)
    try:
        yield client
    finally:
        client.close()
        server.stop(None).wait()
        shutil.rmtree(sock_dir, ignore_errors=True)


def node_info(client: CsiClient) -> csi_pb2.NodeGetInfoResponse:
    return client.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=30)


def failure(client: CsiClient) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        node_info(client)
    return info.value.code(), info.value.details()


ZONED = {
    ZONE_KEY: "eu-west-1a",
    REGION_KEY: "eu-west-1",
    "kubernetes.io/hostname": "worker-1",
}


def test_node_get_info_reports_the_nodes_zone_and_region_labels(plugin, apiserver):
    apiserver.nodes["worker-1"] = ZONED
    info = node_info(plugin)
    assert info.node_id == "worker-1"
    assert dict(info.accessible_topology.segments) == {
        TOPOLOGY_KEY: "worker-1",
        ZONE_KEY: "eu-west-1a",
        REGION_KEY: "eu-west-1",
    }
    # the real client asked for exactly this Node, with the kubeconfig's credentials
    assert apiserver.requests == [("/api/v1/nodes/worker-1", f"Bearer {API_TOKEN}")]


def test_the_labels_are_read_once_and_kept(plugin, apiserver):
    apiserver.nodes["worker-1"] = ZONED
    first = node_info(plugin)
    apiserver.stop()  # an API server outage after registration changes nothing
    assert node_info(plugin) == first
    assert len(apiserver.requests) == 1


def test_a_node_without_zone_labels_reports_only_its_tessera_node_key(plugin, apiserver):
    apiserver.nodes["worker-1"] = {"kubernetes.io/hostname": "worker-1"}
    segments = dict(node_info(plugin).accessible_topology.segments)
    assert segments == {TOPOLOGY_KEY: "worker-1"}


def test_a_node_with_a_zone_but_no_region_reports_the_zone(plugin, apiserver):
    apiserver.nodes["worker-1"] = {ZONE_KEY: "rack-3"}
    segments = dict(node_info(plugin).accessible_topology.segments)
    assert segments == {TOPOLOGY_KEY: "worker-1", ZONE_KEY: "rack-3"}


def test_a_node_id_kubernetes_does_not_know_fails_node_get_info_naming_the_fix(plugin, apiserver):
    apiserver.nodes["someone-else"] = ZONED
    code, message = failure(plugin)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "no Node named 'worker-1'" in message and "spec.nodeName" in message


def test_missing_rbac_fails_node_get_info_naming_get_nodes(plugin, apiserver):
    apiserver.status = 403
    code, message = failure(plugin)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "get" in message and "nodes" in message and "HTTP 403" in message


def test_an_api_server_that_is_down_fails_node_get_info_until_it_answers(plugin, apiserver):
    apiserver.nodes["worker-1"] = ZONED
    apiserver.stop()
    code, message = failure(plugin)
    assert code == grpc.StatusCode.UNAVAILABLE  # never a registration without the zone
    assert "did not answer" in message
    apiserver.start()  # the same port again
    segments = dict(node_info(plugin).accessible_topology.segments)
    assert segments[ZONE_KEY] == "eu-west-1a"


def test_an_api_server_error_is_unavailable_and_retried(plugin, apiserver):
    apiserver.nodes["worker-1"] = ZONED
    apiserver.status = 500
    assert failure(plugin)[0] == grpc.StatusCode.UNAVAILABLE
    apiserver.status = 0
    assert dict(node_info(plugin).accessible_topology.segments)[REGION_KEY] == "eu-west-1"


def test_the_token_of_the_kubeconfig_never_appears_in_an_error(plugin, apiserver):
    apiserver.status = 401
    code, message = failure(plugin)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert API_TOKEN not in message


def test_without_the_flag_node_get_info_never_asks_kubernetes(apiserver, kubeconfig):
    sock_dir = Path(tempfile.mkdtemp(prefix="tk8s-"))
    config = PluginConfig(
        mode=Mode.NODE,
        endpoint=f"unix://{sock_dir / 'csi.sock'}",
        node_id="worker-1",
        agent_url=f"unix://{sock_dir / 'no-agent.sock'}",
        token="t0ken",
        zone="z1",
    )
    server = build_server(config)
    server.start()
    try:
        with CsiClient(config.endpoint) as client:
            segments = dict(node_info(client).accessible_topology.segments)
    finally:
        server.stop(None).wait()
        shutil.rmtree(sock_dir, ignore_errors=True)
    assert segments == {TOPOLOGY_KEY: "worker-1", ZONE_KEY: "z1"}
    assert apiserver.requests == []


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with the openssl command."""
    cert, key = directory / "ca.crt", directory / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_in_a_pod_the_service_account_reaches_the_api_server_over_verified_https(
    monkeypatch, tmp_path
):
    cert, key = self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = FakeApiServer(nodes={"worker-1": ZONED}, tls=context).start()
    try:
        account = tmp_path / "serviceaccount"  # what the kubelet mounts in the pod
        account.mkdir()
        (account / "token").write_text(API_TOKEN)
        shutil.copy(cert, account / "ca.crt")
        monkeypatch.delenv("KUBECONFIG", raising=False)
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.port))
        segments = NodeTopology("worker-1", service_account=account).segments()
        assert segments == {ZONE_KEY: "eu-west-1a", REGION_KEY: "eu-west-1"}
        ((path, auth),) = server.requests
        assert path == "/api/v1/nodes/worker-1"
        assert auth.lower() == f"bearer {API_TOKEN}"  # the scheme's case is free (RFC 9110)
        # a server whose certificate the cluster's CA did not sign is never trusted
        (tmp_path / "other").mkdir()
        other, _ = self_signed(tmp_path / "other")
        shutil.copy(other, account / "ca.crt")
        with pytest.raises(Unavailable, match="SSLError"):
            NodeTopology("worker-1", service_account=account).segments()
        assert len(server.requests) == 1
    finally:
        server.stop()


def test_no_cluster_and_no_kubeconfig_is_a_start_up_error(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubernetesConfigError, match="in-cluster service account"):
        NodeTopology("worker-1")
    with pytest.raises(KubernetesConfigError, match="KUBECONFIG"):
        NodeTopology("worker-1", kubeconfig=str(tmp_path / "missing"))


def test_tessera_csi_with_the_flag_outside_a_cluster_exits_1_saying_why(tmp_path):
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    sock_dir = Path(tempfile.mkdtemp(prefix="tk8s-"))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no KUBECONFIG, no service host
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "csi_driver",
                "--mode",
                "node",
                "--endpoint",
                f"unix://{sock_dir / 'csi.sock'}",
                "--node-id",
                "worker-1",
                "--agent-socket",
                str(sock_dir / "agent.sock"),
                "--token-file",
                str(token),
                "--kubernetes-topology",
                "--log-format",
                "text",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
    assert done.returncode == 1, done.stderr
    assert "--kubernetes-topology" in done.stderr and "KUBECONFIG" in done.stderr


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--zone", "z1"], "--zone and --kubernetes-topology"),
        (["--mode", "controller", "--management", "http://m:8080"], "node (or all) mode"),
    ],
)
def test_the_flag_with_zone_or_in_controller_mode_is_a_usage_error(extra, says, capsys):
    argv = ["--mode", "node", "--endpoint", "unix:///x.sock", "--node-id", "n"]
    argv += ["--agent-socket", "/a.sock", "--token-file", "/t", "--kubernetes-topology", *extra]
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    assert says in capsys.readouterr().err
