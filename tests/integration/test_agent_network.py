"""The agent on TCP beside its unix socket: bearer token, HTTPS with a private CA, registration.

Real agent and management processes; certificates from the openssl CLI.
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tessera.clients import AgentClient, ManagementClient
from tessera.errors import TesseraError, Unavailable
from tessera.http import SERVICE_HEADER
from tessera.models import AgentKey
from tests.conftest import needs_root
from tests.integration.processes import processes as management_processes
from tests.integration.test_exports import (
    CLIENT,
    TOKEN,
    AgentNode,
    agent_nodes,
    new_key,
    new_volume,
)

pytestmark = [needs_root, pytest.mark.root]


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[AgentNode]]:
    with agent_nodes(tmp_path) as started:
        yield started


@pytest.fixture
def node(tmp_path: Path, nodes: list[AgentNode]) -> AgentNode:
    """One agent node of the test (started by the test: its flags vary)."""
    started = AgentNode(tmp_path)
    nodes.append(started)
    return started


def raw_request(
    port: int, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body or None, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_every_v1_route_on_tcp_needs_the_token_and_healthz_is_open(node: AgentNode) -> None:
    node.start().close()
    assert raw_request(node.port, "GET", "/healthz", {})[0] == 200
    for path in ("/v1/node", "/v1/exports", "/v1/volumes"):
        assert raw_request(node.port, "GET", path, {})[0] == 401
        assert raw_request(node.port, "GET", path, {"Authorization": "Bearer nope"})[0] == 401
    status, _ = raw_request(
        node.port, "PUT", "/v1/keys/vol-1", {"Content-Type": "application/json"}, b"{}"
    )
    assert status == 401, "a body without the token is refused before it is read"
    tcp = AgentClient(f"http://127.0.0.1:{node.port}", TOKEN)
    try:
        assert tcp.node().node_id == "owner"
        assert tcp.list_exports() == []
    finally:
        tcp.close()


def test_a_request_meant_for_management_is_refused_unrun_over_tcp(
    node: AgentNode,
) -> None:
    client = node.start()
    vid = new_volume(client, node)
    headers = {"Authorization": f"Bearer {TOKEN}", SERVICE_HEADER: "management"}
    status, _ = raw_request(node.port, "DELETE", f"/v1/volumes/{vid}", headers)
    assert status == 421
    assert client.get_volume(vid).id == vid, "not deleted"
    client.close()


def test_a_bad_export_body_is_refused_without_echoing_the_key(
    node: AgentNode,
) -> None:
    client = node.start()
    vid = new_volume(client, node)
    key = new_key()
    node.secrets.add(key)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    bodies = [
        {"psk_identity": CLIENT, "psk_key": key.upper()},  # the pattern refuses it
        {"psk_identity": CLIENT, "psk_key": key, "readonly": "perhaps"},
        {"psk_identity": CLIENT, "psk_key": key, "surprise": key},
    ]
    for body in bodies:
        status, answer = raw_request(
            node.port, "PUT", f"/v1/exports/{vid}/{CLIENT}", headers, json.dumps(body).encode()
        )
        assert status == 422
        assert key not in answer.decode() and key.upper() not in answer.decode()
    status, answer = raw_request(
        node.port,
        "PUT",
        f"/v1/keys/{vid}",
        headers,
        b'{"psk_identity": "x", "psk_key": "' + key.encode(),
    )
    assert status == 400 and key not in answer.decode()
    client.close()
    node.stop()
    log = node.log.read_text()
    assert key not in log and key.upper() not in log


def test_the_consumers_key_is_stored_private_and_deleted(
    node: AgentNode,
) -> None:
    client = node.start()
    tcp = AgentClient(f"http://127.0.0.1:{node.port}", TOKEN)
    key = new_key()
    node.secrets.add(key)
    vid = "vol-" + "ab" * 16
    tcp.put_key(vid, AgentKey(psk_identity=CLIENT, psk_key=key))
    tcp.put_key(vid, AgentKey(psk_identity=CLIENT, psk_key=key))  # a retry
    stored = node.state / "keys" / f"{vid}.psk"
    assert stored.read_text() == f"{CLIENT}:{key}\n"
    assert stored.stat().st_mode & 0o777 == 0o600
    assert stored.parent.stat().st_mode & 0o777 == 0o700
    tcp.delete_key(vid)
    tcp.delete_key(vid)  # already gone
    assert not stored.exists()
    tcp.close()
    client.close()


def make_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a certificate for 127.0.0.1 it signed (openssl, argument lists)."""
    ca_key, ca, key, csr, cert = (
        directory / n for n in ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem")
    )
    ext = directory / "srv.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    steps = [
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
         "-out", str(ca), "-days", "1", "-subj", "/CN=tessera-test-ca",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(csr), "-subj", "/CN=127.0.0.1"],
        ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-out", str(cert), "-days", "1", "-extfile", str(ext)],
    ]  # fmt: skip
    for argv in steps:
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return ca, cert, key


def test_https_with_a_private_ca_works_with_the_bundle_and_is_refused_without(
    tmp_path: Path, nodes: list[AgentNode]
) -> None:
    ca, cert, key = make_ca_and_server_cert(tmp_path)
    with management_processes(tmp_path) as procs:
        procs.token_file.write_text(TOKEN + "\n")
        procs.start_management()
        mgmt = ManagementClient(procs.management_url, TOKEN)
        procs.clients.append(mgmt)
        node = AgentNode(tmp_path, "n1", management=procs.management_url)
        node.extra = ["--tls-cert", str(cert), "--tls-key", str(key)]
        nodes.append(node)
        local = node.start()
        url = f"https://127.0.0.1:{node.port}"
        trusting = AgentClient(url, TOKEN, ca_file=str(ca))
        doubting = AgentClient(url, TOKEN)
        plain = AgentClient(f"http://127.0.0.1:{node.port}", TOKEN)
        try:
            assert trusting.node().node_id == "n1"
            with pytest.raises(Unavailable, match="CERTIFICATE_VERIFY_FAILED"):
                doubting.node()
            with pytest.raises(TesseraError):
                plain.node()  # plain HTTP to the TLS port gets no Tessera answer
            assert local.node().node_id == "n1", "the unix socket stays plain HTTP"
            assert _registered_url(mgmt, "n1") == url
        finally:
            for client in (trusting, doubting, plain, local):
                client.close()
        assert node.stop(signal.SIGTERM) == 0, "SIGTERM stops both listeners"
        assert not node.socket.exists()


def _registered_url(mgmt: ManagementClient, node_id: str) -> str:
    deadline = time.monotonic() + 20
    while True:
        try:
            return mgmt.get_node(node_id).agent_url
        except TesseraError:  # not registered yet
            assert time.monotonic() < deadline
            time.sleep(0.1)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert", "c.pem"], "go together"),
        (["--tls-cert", "c.pem", "--tls-key", "k.pem"], "needs --listen"),
        (["--listen", "0.0.0.0:1"], "--advertise"),
        (["--listen", "nonsense"], "HOST:PORT"),
        (["--export-ports", "20-10"], "port range"),
        (["--listen", "127.0.0.1:1", "--tls-cert", "c.pem", "--tls-key", "k.pem"], "--tls-cert"),
        (["--ca-bundle", "missing.pem"], "--ca-bundle"),
    ],
)
def test_flags_that_cannot_work_are_refused_at_start(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    (tmp_path / "token").write_text(TOKEN)
    done = subprocess.run(
        [sys.executable, "-m", "node_agent", "--node-id", "n1", "--management", "unix:///x",
         "--token-file", str(tmp_path / "token"), "--pool", f"default={tmp_path}",
         "--socket", str(tmp_path / "a.sock"), "--state-dir", str(tmp_path / "s"),
         "--no-register", *flags],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0 and message in done.stderr
