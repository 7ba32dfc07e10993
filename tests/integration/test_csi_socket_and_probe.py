"""The real `tessera-csi` process: one instance per socket, and a Probe kubelet can live with.

Processes, not in-process servers: what is tested is what a second copy
started by mistake does to the first one's socket, what a SIGKILL leaves
behind, and how Probe behaves while its peers come and go, all of which
only exist between processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver._gen import csi_pb2
from tessera.clients import ManagementClient
from tessera_dev.csi_client import CsiClient
from tests.conftest import needs_root
from tests.integration.processes import spawn_module

TOKEN = "csi-process-test-token-0123456789"
START_TIMEOUT = 30.0


class Procs:
    """Processes started by one test, their logs, and their sockets in a short directory."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        # unix socket paths are limited to ~107 bytes; tmp_path can be longer
        self.sockets = Path(tempfile.mkdtemp(prefix="tcsp-"))
        self.token_file = tmp / "token"
        self.token_file.write_text(TOKEN + "\n")
        os.chmod(self.token_file, 0o600)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def sock(self, name: str) -> Path:
        return self.sockets / f"{name}.sock"

    def url(self, name: str) -> str:
        return f"unix://{self.sock(name)}"

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        proc = spawn_module(args, self.tmp / f"{name}.log")
        self.procs[name] = proc
        return proc

    def csi(self, name: str, mode: str = "controller", endpoint: str = "csi") -> None:
        args = [
            "csi_driver", "--mode", mode, "--endpoint", self.url(endpoint),
            "--token-file", str(self.token_file), "--management", self.url("management"),
        ]  # fmt: skip
        if mode != "controller":
            args += ["--node-id", "probe-node", "--agent-socket", str(self.sock("agent"))]
        self.spawn(name, args)

    def management(self) -> ManagementClient:
        self.spawn("management", [
            "management", "--listen", self.url("management"),
            "--db", f"sqlite:///{self.tmp / 'management.db'}",
            "--token-file", str(self.token_file),
        ])  # fmt: skip
        client = ManagementClient(self.url("management"), TOKEN)
        self.wait_until("management", client.healthy)
        return client

    def agent(self) -> None:
        pool = self.tmp / "pool"
        pool.mkdir(exist_ok=True)
        self.spawn("agent", [
            "node_agent", "--node-id", "probe-node", "--management", self.url("management"),
            "--token-file", str(self.token_file), "--pool", f"default={pool}",
            "--socket", str(self.sock("agent")), "--dev-dir", str(self.tmp / "dev"),
        ])  # fmt: skip

    def wait_until(self, name: str, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            proc = self.procs[name]
            assert proc.poll() is None, f"{name} exited {proc.returncode}:\n{self.log(name)}"
            assert time.monotonic() < deadline, f"{name} is not there yet:\n{self.log(name)}"
            time.sleep(0.05)

    def stop(self, name: str, sig: signal.Signals = signal.SIGTERM) -> int:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
        return proc.wait(timeout=30)

    def close(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            assert proc.returncode is not None, name
        shutil.rmtree(self.sockets, ignore_errors=True)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.close()


def answers(endpoint: str) -> bool:
    """Whether a CSI plugin answers GetPluginInfo on the endpoint."""
    with CsiClient(endpoint) as client:
        try:
            client.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return True


def ready(endpoint: str) -> bool:
    with CsiClient(endpoint) as client:
        reply = client.identity.Probe(csi_pb2.ProbeRequest(), timeout=10)
    assert reply.HasField("ready"), "Probe must say whether the plugin is ready"
    return reply.ready.value


def wait_exit(proc: subprocess.Popen[bytes]) -> int:
    return proc.wait(timeout=START_TIMEOUT)


# ---- one instance per socket ----------------------------------------------------------------


def test_a_second_plugin_on_a_live_socket_exits_and_the_first_keeps_serving(procs: Procs) -> None:
    procs.csi("first")
    procs.wait_until("first", lambda: answers(procs.url("csi")))
    inode = procs.sock("csi").stat().st_ino

    procs.csi("second")
    code = wait_exit(procs.procs["second"])

    assert code != 0, "a second instance must not run beside the first"
    assert f"another process is serving on {procs.sock('csi')}" in procs.log("second")
    assert "Traceback" not in procs.log("second")
    assert procs.sock("csi").stat().st_ino == inode, "the live socket was replaced"
    assert answers(procs.url("csi")), "the first plugin lost its socket"
    assert procs.procs["first"].poll() is None


def test_a_socket_left_by_a_killed_plugin_is_replaced(procs: Procs) -> None:
    procs.csi("killed")
    procs.wait_until("killed", lambda: answers(procs.url("csi")))
    assert procs.stop("killed", signal.SIGKILL) == -signal.SIGKILL
    assert procs.sock("csi").is_socket(), "SIGKILL leaves the socket file behind"

    procs.csi("next")
    procs.wait_until("next", lambda: answers(procs.url("csi")))


def test_a_file_that_is_not_a_socket_is_never_replaced(procs: Procs) -> None:
    procs.sock("csi").write_text("precious")
    procs.csi("plugin")
    assert wait_exit(procs.procs["plugin"]) != 0
    assert "is not a socket" in procs.log("plugin")
    assert procs.sock("csi").read_text() == "precious"


@needs_root
def test_the_agent_refuses_a_socket_another_agent_serves(procs: Procs) -> None:
    procs.agent()
    procs.wait_until("agent", lambda: procs.sock("agent").is_socket() and _connects(procs))
    first = procs.procs["agent"]
    procs.agent()  # the same socket
    second = procs.procs["agent"]
    assert wait_exit(second) != 0
    assert "another process is serving" in procs.log("agent")
    assert first.poll() is None and _connects(procs)
    procs.procs["agent-first"] = first  # stopped at the end with the others


def _connects(procs: Procs) -> bool:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(str(procs.sock("agent")))
    except OSError:
        return False
    finally:
        s.close()
    return True


# ---- Probe ------------------------------------------------------------------------------------


def _create_request(name: str) -> csi_pb2.CreateVolumeRequest:
    return csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=16 << 20),
        volume_capabilities=[
            csi_pb2.VolumeCapability(
                block=csi_pb2.VolumeCapability.BlockVolume(),
                access_mode=csi_pb2.VolumeCapability.AccessMode(mode=1),
            )
        ],
    )


@needs_root
def test_probe_waits_for_registration_then_stays_ready_through_outages(procs: Procs) -> None:
    endpoint = procs.url("csi")
    procs.agent()  # management is not up: the agent keeps trying to register
    procs.csi("plugin", mode="all")
    procs.wait_until("plugin", lambda: answers(endpoint))
    assert not ready(endpoint), "ready before management knows this node and its pools"

    procs.management()
    procs.wait_until("plugin", lambda: ready(endpoint))
    with CsiClient(endpoint) as client:
        # the first CreateVolume after the first ready Probe finds a pool
        created = client.controller.CreateVolume(_create_request("right-after-ready"), timeout=60)
        assert created.volume.volume_id

        procs.stop("management")
        assert ready(endpoint), "a management outage must not fail the liveness probe"
        with pytest.raises(grpc.RpcError) as err:
            client.controller.CreateVolume(_create_request("during-the-outage"), timeout=60)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()

        procs.stop("agent")
        assert ready(endpoint), "an agent outage must not fail the liveness probe"
        with pytest.raises(grpc.RpcError) as err:
            client.node.NodeGetVolumeStats(
                csi_pb2.NodeGetVolumeStatsRequest(
                    volume_id=created.volume.volume_id, volume_path=str(procs.tmp)
                ),
                timeout=60,
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert "UNAVAILABLE" in procs.log("plugin"), "outages belong in the plugin's log"
    assert procs.procs["plugin"].poll() is None
