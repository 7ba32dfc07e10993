"""What the multi-host tests share: skip marks, the cluster under test, and
`Kube`, a per-test CSI facade that sends what kubelet and the sidecars would
send (controller plugin on the stack's socket, each node's plugin on its own)
and remembers everything it made so the fixture tears it down even when the
test failed.

I/O runs as a separate process inside the consuming node's network
namespace (`tests.multihost.blockio`), like a pod on that node.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from csi_driver._gen import csi_pb2, csi_pb2_grpc
from tessera.clients import AgentClient, ManagementClient
from tessera.system.loopdev import bound_under
from tessera.system.mounts import mounts_under
from tessera_dev import netns
from tessera_dev.multinode import MultiNodeStack, MultiStackInfo, NodeInfo
from tessera_dev.netns import in_netns

REPO = Path(__file__).resolve().parents[2]
TOPOLOGY_KEY = "topology.tessera.io/node"
RPC_TIMEOUT = 120.0
MiB = 1024**2
VOLUME_SIZE = 64 * MiB
BLOCK = 4096
#: generous: a 2-core CI box under load; these are deadlines, not measurements
SETTLE = 60.0

Mode = csi_pb2.VolumeCapability.AccessMode.Mode
Code = grpc.StatusCode

_TOOLS = ("nbdkit", "nbdfuse", "ip", "nsenter", "nbdinfo", "losetup")
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: network namespaces, loop devices, FUSE and mounts"
)
needs_tools = pytest.mark.skipif(
    any(shutil.which(t) is None for t in _TOOLS),
    reason=f"needs {', '.join(t for t in _TOOLS if shutil.which(t) is None)} "
    "(packages nbdkit, libnbd-bin, iproute2, util-linux)",
)


# ---- capabilities --------------------------------------------------------------------


def block_cap(mode: str = "SINGLE_NODE_WRITER") -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=Mode.Value(mode)),
    )


def mount_cap(mode: str = "SINGLE_NODE_WRITER", fs_type: str = "ext4") -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=Mode.Value(mode)),
    )


# ---- errors --------------------------------------------------------------------------


def call_error(call: Callable[[], Any]) -> grpc.RpcError:
    try:
        reply = call()
    except grpc.RpcError as err:
        return err
    raise AssertionError(f"expected the call to be refused, it answered OK: {reply!r}")


def assert_code(err: grpc.RpcError, code: Code, *mentions: str) -> None:
    details = err.details() or ""
    assert err.code() == code, f"expected {code.name}, got {err.code().name}: {details!r}"
    for word in mentions:
        assert word in details, f"the {code.name} message should name {word!r}: {details!r}"


def errno_name(answer: str) -> str:
    """`errno 30` -> `EROFS`, for readable assertion messages."""
    if answer.startswith("errno "):
        return errno.errorcode.get(int(answer.split()[1]), answer)
    return answer


# ---- the cluster ---------------------------------------------------------------------


@dataclass
class Cluster:
    """A started MultiNodeStack and a client for each of its sockets."""

    stack: MultiNodeStack
    info: MultiStackInfo
    work: Path  # where "kubelet" puts staging and target paths, one directory per node
    token: str
    controller: csi_pb2_grpc.ControllerStub = field(init=False)
    node_csi: dict[str, csi_pb2_grpc.NodeStub] = field(init=False)
    mgmt: ManagementClient = field(init=False)
    channels: list[grpc.Channel] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.controller = csi_pb2_grpc.ControllerStub(self._channel(self.info.csi_endpoint))
        self.node_csi = {
            n.node_id: csi_pb2_grpc.NodeStub(self._channel(n.csi_endpoint)) for n in self.info.nodes
        }
        self.mgmt = ManagementClient(self.info.management_url, self.token)

    def _channel(self, endpoint: str) -> grpc.Channel:
        self.channels.append(grpc.insecure_channel(endpoint))
        return self.channels[-1]

    def close(self) -> None:
        self.mgmt.close()
        for channel in self.channels:
            channel.close()

    def node(self, node_id: str) -> NodeInfo:
        return self.info.node(node_id)

    def agent(self, node_id: str) -> AgentClient:
        """The node's agent on its local socket (the caller closes it)."""
        return AgentClient(f"unix://{self.node(node_id).agent_socket}", self.token)

    def argv_on(self, node_id: str, argv: list[str]) -> list[str]:
        """argv in the node's network namespace; mounts stay shared with the host."""
        return in_netns(self.node(node_id).netns, argv)

    def io(self, node_id: str, *args: object, timeout: float = SETTLE) -> str:
        """One blockio command run on the node; its one-line answer."""
        argv = self.argv_on(node_id, [sys.executable, "-m", "tests.multihost.blockio",
                                      *map(str, args)])  # fmt: skip
        res = subprocess.run(
            argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
        )
        assert res.returncode == 0, f"blockio {args[0]} on {node_id} failed: {res.stderr[-1500:]}"
        return res.stdout.strip()

    def start_writer(
        self, node_id: str, device: str, log: Path, blocks: int
    ) -> subprocess.Popen[bytes]:
        argv = self.argv_on(node_id, [sys.executable, "-m", "tests.multihost.blockio", "writer",
                                      device, str(log), str(blocks)])  # fmt: skip
        return subprocess.Popen(
            argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip

    def tessera(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The `tessera` CLI as an admin runs it against this cluster's management."""
        return subprocess.run(
            [sys.executable, "-m", "tessera.cli", *args, "--management",
             self.info.management_url, "--token-file", str(self.info.token_file)],
            cwd=REPO, capture_output=True, text=True, timeout=SETTLE, check=False,
        )  # fmt: skip


def logged(log: Path) -> list[str]:
    """The writer's log lines: a block number per fsync'd write, or `errno N` at the end."""
    return log.read_text().splitlines() if log.exists() else []


def wait_until(check: Callable[[], bool], what: str, timeout: float = SETTLE) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.1)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


# ---- leftovers -----------------------------------------------------------------------


def processes_mentioning(*paths: Path) -> list[str]:
    found = []
    needles = [str(p) for p in paths]
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if any(n in cmdline for n in needles):
            found.append(f"{proc.info['pid']}: {cmdline[:200]}")
    return found


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def data_path_in_use(state: Path, work: Path) -> dict[str, list[str]]:
    """What is still attached once every test cleaned up: only the pools may be."""
    pools = [Path(p).resolve() for p in state.glob("nodes/*/pool")]
    return {
        "mounts": [m for d in (state, work) for m in mounts_under(d) if Path(m) not in pools],
        "loop devices": [
            f"{b.path} ({b.backing})"
            for b in bound_under(state)
            if not b.backing.endswith("/pool.img")
        ],
        "data-path processes": [
            p for p in processes_mentioning(state) if " nbdkit " in f" {p} " or "nbdfuse" in p
        ],
    }


def assert_nothing_left(state: Path, work: Path, namespaces: set[str]) -> None:
    """What `stop()` and the tests' own cleanup must have undone."""
    left = {
        "namespaces": sorted(namespaces & netns_names()),
        "links": netns.links(netns.tag_of(state)),
        "mounts": [m for d in (state, work) for m in mounts_under(d)],
        "loop devices": [b.path for d in (state, work) for b in bound_under(d)],
        "processes": processes_mentioning(state, work),
    }
    assert not any(left.values()), f"left behind after the stack stopped: {left}"


@contextmanager
def running_cluster(
    stack: MultiNodeStack, state: Path, work: Path, after_close: Callable[[], None] | None = None
) -> Iterator[Cluster]:
    """Start `stack` (state in `state`, kubelet paths in `work`) and yield its Cluster.

    On the way out, even after a failed start: close the clients, run
    `after_close`, stop the stack and assert the machine is as clean as
    before. What the tests left attached is looked at before stop(), which
    sweeps whatever it finds and would hide a leak of theirs, and asserted
    after it, so the machine is clean either way.
    """
    namespaces: set[str] = set()
    cluster = None
    try:
        info = stack.start()
        namespaces = {n.netns for n in info.nodes}
        cluster = Cluster(stack, info, work, Path(info.token_file).read_text().strip())
        yield cluster
    finally:
        if cluster is not None:
            cluster.close()
        if after_close is not None:
            after_close()
        try:
            in_use = data_path_in_use(state, work)
        finally:
            stack.stop()
        assert_nothing_left(state, work, namespaces)
        assert not any(in_use.values()), f"the tests' volumes left behind: {in_use}"
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


# ---- the per-test CSI facade ---------------------------------------------------------


@dataclass
class Published:
    volume_id: str
    node_id: str
    staging: Path
    target: Path
    publish_context: dict[str, str]


class Kube:
    """One test's kubelet and sidecars. `cleanup()` undoes what is left, newest first."""

    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        self._undo: dict[tuple[str, ...], Callable[[], Any]] = {}

    def create(
        self,
        cap: csi_pb2.VolumeCapability | list[csi_pb2.VolumeCapability],
        on: str = "n1",
        size: int = VOLUME_SIZE,
    ) -> str:
        """A volume placed on node `on` (locality preferred, as a StorageClass would ask)."""
        caps = cap if isinstance(cap, list) else [cap]
        reply = self.c.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=f"mh-{secrets.token_hex(6)}",
                capacity_range=csi_pb2.CapacityRange(required_bytes=size),
                volume_capabilities=caps,
                parameters={"locality": "preferred"},
                accessibility_requirements=csi_pb2.TopologyRequirement(
                    preferred=[csi_pb2.Topology(segments={TOPOLOGY_KEY: on})]
                ),
            ),
            timeout=RPC_TIMEOUT,
        )
        vid = reply.volume.volume_id
        self._undo[("volume", vid)] = lambda: self.c.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=vid), timeout=RPC_TIMEOUT
        )
        return vid

    def controller_publish(
        self, vid: str, node_id: str, cap: csi_pb2.VolumeCapability, readonly: bool = False
    ) -> dict[str, str]:
        # Remembered first: a publish that failed half way may still have happened.
        self._undo[("cpub", vid, node_id)] = lambda: self.controller_unpublish(vid, node_id)
        reply = self.c.controller.ControllerPublishVolume(
            csi_pb2.ControllerPublishVolumeRequest(
                volume_id=vid, node_id=node_id, volume_capability=cap, readonly=readonly
            ),
            timeout=RPC_TIMEOUT,
        )
        return dict(reply.publish_context)

    def controller_unpublish(self, vid: str, node_id: str) -> None:
        self.c.controller.ControllerUnpublishVolume(
            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=node_id),
            timeout=RPC_TIMEOUT,
        )
        self._undo.pop(("cpub", vid, node_id), None)

    def publish(
        self, vid: str, node_id: str, cap: csi_pb2.VolumeCapability, readonly: bool = False
    ) -> Published:
        """ControllerPublish, NodeStage, NodePublish: the volume as a pod on node_id sees it."""
        ctx = self.controller_publish(vid, node_id, cap, readonly)
        base = self.c.work / node_id
        base.mkdir(exist_ok=True)
        staging = Path(os.path.join(base, f"staging-{vid}"))
        target = Path(os.path.join(base, f"target-{vid}"))
        staging.mkdir(exist_ok=True)
        node = self.c.node_csi[node_id]
        self._undo[("stage", vid, node_id)] = lambda: self.unstage(vid, node_id, staging)
        node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=vid, publish_context=ctx, staging_target_path=str(staging),
                volume_capability=cap,
            ),
            timeout=RPC_TIMEOUT,
        )  # fmt: skip
        self._undo[("publish", vid, node_id)] = lambda: self.unpublish_target(vid, node_id, target)
        node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=vid, publish_context=ctx, staging_target_path=str(staging),
                target_path=str(target), volume_capability=cap, readonly=readonly,
            ),
            timeout=RPC_TIMEOUT,
        )  # fmt: skip
        return Published(vid, node_id, staging, target, ctx)

    def unpublish_target(self, vid: str, node_id: str, target: Path) -> None:
        self.c.node_csi[node_id].NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target)),
            timeout=RPC_TIMEOUT,
        )
        self._undo.pop(("publish", vid, node_id), None)

    def unstage(self, vid: str, node_id: str, staging: Path) -> None:
        self.c.node_csi[node_id].NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)),
            timeout=RPC_TIMEOUT,
        )
        self._undo.pop(("stage", vid, node_id), None)

    def unpublish(self, pub: Published) -> None:
        """NodeUnpublish, NodeUnstage, ControllerUnpublish: the pod left the node."""
        self.unpublish_target(pub.volume_id, pub.node_id, pub.target)
        self.unstage(pub.volume_id, pub.node_id, pub.staging)
        self.controller_unpublish(pub.volume_id, pub.node_id)

    def cleanup(self) -> None:
        """Undo everything left, newest first; every step is tried, the first error raised."""
        first: Exception | None = None
        for key in reversed(list(self._undo)):
            undo = self._undo.pop(key, None)
            if undo is None:
                continue
            try:
                undo()
            except Exception as exc:  # noqa: BLE001 - keep tearing down, report the first
                first = first or exc
        if first is not None:
            raise first
