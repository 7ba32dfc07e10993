"""Errors keep their meaning across hops (issue 7, item 4), on real processes.

A management URL with a wrong path prefix reaches only unknown routes. That
must surface as a configuration error - never as "not found", which would
let DeleteVolume and ControllerUnpublishVolume answer OK while the volume
and its attachment stay. A call that was sent and never answered may have
run: it is "outcome unknown" (and sent once more), not "unreachable".
"""

from __future__ import annotations

import socketserver
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import grpc
import httpx
import pytest

from csi_driver._gen import csi_pb2
from csi_driver.interceptor import status_for
from tessera.clients import AgentClient, ManagementClient
from tessera.errors import (
    PROBLEM_TYPE_PREFIX,
    Misconfigured,
    NotFound,
    OutcomeUnknown,
    Unavailable,
)
from tessera.http import SERVICE_HEADER, JsonClient, Service
from tessera.ids import new_volume_id
from tessera.models import AccessMode, VolumeCreate, VolumeState
from tessera_dev.csi_client import CsiClient, block_capability
from tests.conftest import needs_root
from tests.fuzz.rest_fixtures import NODE_ID, TOKEN, RestStack, free_port, running_stack

pytestmark = [needs_root, pytest.mark.root]
MiB = 1024**2


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestStack]:
    with running_stack(tmp_path_factory.mktemp("error-meaning"), 512 * MiB) as rest:
        yield rest


@contextmanager
def controller_with_management_at(
    stack: RestStack, tmp_path: Path, name: str, management_url: str
) -> Iterator[CsiClient]:
    """A CSI controller process whose --management is `management_url`."""
    endpoint = f"unix://{tmp_path / 'csi.sock'}"
    proc = stack.spawn(
        name,
        ["csi_driver", "--mode", "controller", "--endpoint", endpoint,
         "--management", management_url, "--token-file", str(stack.token_file)],
    )  # fmt: skip
    client = CsiClient(endpoint)
    try:
        _wait_for_plugin(client, proc.poll, stack, name)
        yield client
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=15)
        del stack.procs[name]


@pytest.fixture
def wrong_prefix_controller(stack: RestStack, tmp_path: Path) -> Iterator[CsiClient]:
    """A CSI controller whose --management URL has a path prefix management does not serve."""
    with controller_with_management_at(
        stack, tmp_path, "csi-wrong-prefix", f"{stack.url}/wrong"
    ) as client:
        yield client


@pytest.fixture
def agent_as_management_controller(stack: RestStack, tmp_path: Path) -> Iterator[CsiClient]:
    """A CSI controller whose --management is the agent's socket (they sit side by side)."""
    with controller_with_management_at(
        stack, tmp_path, "csi-agent-as-management", stack.agent_url
    ) as client:
        yield client


def _wait_for_plugin(client: CsiClient, poll: object, stack: RestStack, name: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert callable(poll) and poll() is None, stack.log(name)
        try:
            client.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=2)
            return
        except grpc.RpcError:
            assert time.monotonic() < deadline, stack.log(name)
            time.sleep(0.1)


def _volume_files(stack: RestStack) -> list[str]:
    volumes = stack.pool_dir / "volumes"
    return sorted(p.name for p in volumes.iterdir()) if volumes.exists() else []


def test_delete_volume_through_a_wrong_url_prefix_fails_loudly_and_the_volume_stays(
    stack: RestStack, wrong_prefix_controller: CsiClient
) -> None:
    mgmt = stack.management()
    volume = mgmt.create_volume(VolumeCreate(name="keep-me-wrong-prefix", size_bytes=16 * MiB))
    mgmt.attach(volume.id, NODE_ID, AccessMode.SINGLE_NODE_WRITER, readonly=False)
    try:
        controller = wrong_prefix_controller.controller
        with pytest.raises(grpc.RpcError) as unpublish:
            controller.ControllerUnpublishVolume(
                csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume.id, node_id=NODE_ID)
            )
        assert unpublish.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "check the URL" in (unpublish.value.details() or "")
        assert [a.node_id for a in mgmt.list_attachments(volume.id)] == [NODE_ID]

        mgmt.detach(volume.id, NODE_ID)
        with pytest.raises(grpc.RpcError) as delete:
            controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.id))
        assert delete.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = delete.value.details() or ""
        assert f"{stack.url}/wrong" in details and "prefix" in details, details
        assert mgmt.get_volume(volume.id).state == VolumeState.AVAILABLE
        assert _volume_files(stack) == [f"{volume.id}.img"]
    finally:
        mgmt.detach(volume.id, NODE_ID)
        mgmt.delete_volume(volume.id)
        mgmt.close()
    assert _volume_files(stack) == []


def test_delete_volume_with_the_agent_socket_as_management_url_keeps_the_volume(
    stack: RestStack, agent_as_management_controller: CsiClient
) -> None:
    """The agent serves DELETE /v1/volumes/{id} too, with the same token: it must not be used."""
    mgmt = stack.management()
    volume = mgmt.create_volume(VolumeCreate(name="keep-me-agent-url", size_bytes=16 * MiB))
    try:
        with pytest.raises(grpc.RpcError) as delete:
            agent_as_management_controller.controller.DeleteVolume(
                csi_pb2.DeleteVolumeRequest(volume_id=volume.id)
            )
        assert delete.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = delete.value.details() or ""
        assert f"{stack.agent_url} is the node-agent, not management: check --management" in (
            details
        ), details
        assert _volume_files(stack) == [f"{volume.id}.img"]
        assert mgmt.get_volume(volume.id).state == VolumeState.AVAILABLE
    finally:
        mgmt.delete_volume(volume.id)
        mgmt.close()
    assert _volume_files(stack) == []


def test_clients_refuse_the_other_service_and_call_it_unhealthy(stack: RestStack) -> None:
    as_agent = AgentClient(stack.url, TOKEN)
    as_management = ManagementClient(stack.agent_url, TOKEN)
    try:
        assert not as_agent.healthy() and not as_management.healthy()
        with pytest.raises(Misconfigured, match="is the management, not node-agent"):
            as_agent.list_volumes()
        with pytest.raises(Misconfigured, match="is the node-agent, not management"):
            as_management.delete_volume(new_volume_id())
    finally:
        as_agent.close()
        as_management.close()


@pytest.mark.parametrize(
    ("method", "path", "token", "status"),
    [("GET", "/healthz", None, 200), ("GET", "/v1/volumes", None, 401),
     ("GET", "/v1/volumes", TOKEN, 200), ("GET", "/v2/nothing", TOKEN, 404),
     ("DELETE", "/v1/volumes/vol-00000000000000000000000000000000", TOKEN, None),
     ("PATCH", "/v1/volumes", TOKEN, 405)],
)  # fmt: skip
def test_every_answer_of_both_services_names_the_service(
    stack: RestStack, method: str, path: str, token: str | None, status: int | None
) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    transport = httpx.HTTPTransport(uds=str(stack.agent_socket))
    with httpx.Client(transport=transport, base_url="http://agent") as agent:
        from_agent = agent.request(method, path, headers=headers)
    from_management = httpx.request(method, stack.url + path, headers=headers, timeout=10)
    for reply, service in ((from_agent, "node-agent"), (from_management, "management")):
        assert status is None or reply.status_code == status, reply.text
        assert reply.headers.get(SERVICE_HEADER) == service, (reply.status_code, reply.headers)


def test_create_volume_through_a_wrong_url_prefix_fails_and_creates_nothing(
    stack: RestStack, wrong_prefix_controller: CsiClient
) -> None:
    with pytest.raises(grpc.RpcError) as create:
        wrong_prefix_controller.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name="never-made",
                capacity_range=csi_pb2.CapacityRange(required_bytes=16 * MiB),
                volume_capabilities=[block_capability()],
            )
        )
    assert create.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    mgmt = stack.management()
    try:
        assert [v.name for v in mgmt.list_volumes().items] == []
    finally:
        mgmt.close()
    assert _volume_files(stack) == []


def test_a_client_with_a_wrong_prefix_gets_a_configuration_error_never_not_found(
    stack: RestStack,
) -> None:
    wrong = stack.management(f"{stack.url}/wrong")
    right = stack.management()
    try:
        with pytest.raises(Misconfigured) as err:
            wrong.delete_volume(new_volume_id())
        assert not isinstance(err.value, NotFound)
        with pytest.raises(NotFound):  # the same call, rightly addressed: the volume is gone
            right.delete_volume(new_volume_id())
    finally:
        wrong.close()
        right.close()


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/wrong/v1/volumes", 404), ("DELETE", "/v2/volumes/vol-1", 404),
     ("PATCH", "/v1/volumes", 405)],
)  # fmt: skip
def test_management_answers_an_unknown_route_or_method_with_its_own_problem_type(
    stack: RestStack, method: str, path: str, status: int
) -> None:
    reply = httpx.request(
        method, stack.url + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    )
    assert reply.status_code == status
    assert reply.headers["content-type"] == "application/problem+json"
    problem = reply.json()
    assert problem["type"] == PROBLEM_TYPE_PREFIX + "no-such-route"
    assert problem["status"] == status
    assert path in problem["detail"] and "check the URL" in problem["detail"]


def test_the_agent_answers_an_unknown_route_with_its_own_problem_type(stack: RestStack) -> None:
    transport = httpx.HTTPTransport(uds=str(stack.agent_socket))
    with httpx.Client(transport=transport, base_url="http://agent") as agent:
        reply = agent.get("/v2/volumes/vol-1", headers={"Authorization": f"Bearer {TOKEN}"})
    assert reply.status_code == 404
    assert reply.json()["type"] == PROBLEM_TYPE_PREFIX + "no-such-route"


# ---- a call sent and never answered ----------------------------------------------------


class _SleepyHandler(BaseHTTPRequestHandler):
    """Answers every request only after the client has given up."""

    protocol_version = "HTTP/1.1"
    received: list[str] = []

    def do_DELETE(self) -> None:  # noqa: N802 - http.server's naming
        self.received.append(self.path)
        time.sleep(SLEEP)
        try:
            self.send_response(204)
            self.end_headers()
        except OSError:
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


CLIENT_TIMEOUT = 0.5
SLEEP = 2.0


@pytest.fixture
def sleepy_server() -> Iterator[str]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _SleepyHandler)
    server.daemon_threads = True
    _SleepyHandler.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_delete_sent_and_never_answered_is_outcome_unknown_and_sent_once_more(
    sleepy_server: str,
) -> None:
    client = JsonClient(sleepy_server, TOKEN, service=Service.MANAGEMENT, timeout=CLIENT_TIMEOUT)
    try:
        with pytest.raises(OutcomeUnknown) as err:
            client.request("DELETE", "/v1/volumes/vol-1")
    finally:
        client.close()
    assert not isinstance(err.value, Unavailable | NotFound)
    assert "may have run" in err.value.message
    assert _SleepyHandler.received == ["/v1/volumes/vol-1", "/v1/volumes/vol-1"]
    assert status_for(err.value) == grpc.StatusCode.DEADLINE_EXCEEDED


def test_only_a_failure_to_connect_is_unreachable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    client = JsonClient(url, TOKEN, service=Service.MANAGEMENT, timeout=CLIENT_TIMEOUT)
    with pytest.raises(Unavailable) as err:
        client.request("DELETE", "/v1/volumes/vol-1")
    assert "unreachable" in err.value.message and url in err.value.message
    assert status_for(err.value) == grpc.StatusCode.UNAVAILABLE
