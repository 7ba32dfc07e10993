"""A stage/publish sequence converges when a process is SIGKILLed between steps.

Kubelet and the sidecars retry forever, so after a crash at any point the
same calls come again: they must succeed, the data must be intact, and
nothing may leak (loop devices, mounts).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver._gen import csi_pb2
from tessera.system.loopdev import bound_under
from tessera.system.mounts import mounts_under
from tessera_dev.csi_client import CsiClient, block_capability, mount_capability
from tessera_dev.stack import DevStack
from tests.conftest import needs_root

pytestmark = needs_root
MiB = 1024**2
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL}


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[DevStack]:
    dev = DevStack(tmp_path / "state", pool_size=2 * 1024**3, node_id="crash-node")
    dev.start()
    try:
        yield dev
    finally:
        dev.stop()
    assert bound_under(tmp_path / "state") == []
    assert mounts_under(tmp_path) == []


def call_until_ok(call: Callable[[], object], what: str = "", attempts: int = 50) -> object:
    """What kubelet does: retry a failed call until it succeeds."""
    for _ in range(attempts):
        try:
            return call()
        except grpc.RpcError as err:
            if err.code() not in RETRYABLE:
                raise
            time.sleep(0.2)
    raise AssertionError(f"{what or 'the call'} never converged")


class Sequence:
    """The CSI calls of a pod's life on one node, as a list of steps."""

    def __init__(self, csi: CsiClient, node_id: str, work: Path, access: str) -> None:
        self.csi, self.node_id, self.access = csi, node_id, access
        self.cap = mount_capability("ext4") if access == "mount" else block_capability()
        self.staging, self.target = work / "staging", work / "target"
        self.payload = os.urandom(2 * MiB)
        vol = csi.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=f"crash-{access}",
                capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
                volume_capabilities=[self.cap],
            )
        ).volume
        self.volume_id = vol.volume_id

    def steps(self) -> list[tuple[str, Callable[[], object]]]:
        up = [
            ("controller-publish", self.controller_publish),
            ("stage", self.stage),
            ("publish", self.publish),
        ]
        down = [
            ("unpublish", self.unpublish),
            ("unstage", self.unstage),
            ("controller-unpublish", self.controller_unpublish),
        ]
        return [*up, ("write", self.write), *down, *up, ("verify", self.verify), *down]

    def controller_publish(self) -> object:
        return self.csi.controller.ControllerPublishVolume(
            csi_pb2.ControllerPublishVolumeRequest(
                volume_id=self.volume_id, node_id=self.node_id, volume_capability=self.cap
            )
        )

    def stage(self) -> object:
        return self.csi.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=self.volume_id,
                staging_target_path=str(self.staging),
                volume_capability=self.cap,
            )
        )

    def publish(self) -> object:
        return self.csi.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=self.volume_id,
                staging_target_path=str(self.staging),
                target_path=str(self.target),
                volume_capability=self.cap,
            )
        )

    def unpublish(self) -> object:
        return self.csi.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=self.volume_id, target_path=str(self.target)
            )
        )

    def unstage(self) -> object:
        return self.csi.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(
                volume_id=self.volume_id, staging_target_path=str(self.staging)
            )
        )

    def controller_unpublish(self) -> object:
        return self.csi.controller.ControllerUnpublishVolume(
            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=self.volume_id, node_id=self.node_id)
        )

    def _data_path(self) -> Path:
        return self.target / "data.bin" if self.access == "mount" else self.target

    def write(self) -> None:
        with open(self._data_path(), "r+b" if self.access == "block" else "wb") as f:
            f.write(self.payload)
            f.flush()
            os.fsync(f.fileno())

    def verify(self) -> None:
        with open(self._data_path(), "rb") as f:
            got = f.read(len(self.payload))
        assert hashlib.sha256(got).digest() == hashlib.sha256(self.payload).digest()

    def delete(self) -> None:
        self.csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=self.volume_id))


@pytest.mark.parametrize("access", ["mount", "block"])
@pytest.mark.parametrize("victim", ["csi", "node-agent"])
def test_sequence_converges_after_sigkill_between_any_two_steps(
    stack: DevStack, tmp_path: Path, victim: str, access: str
) -> None:
    with CsiClient(stack.info.csi_endpoint) as csi:
        seq = Sequence(csi, stack.node_id, tmp_path / "work", access)
        for i, (name, step) in enumerate(seq.steps()):
            if i > 0:  # kill between every two steps
                stack.kill(victim)
                stack.respawn(victim)
            call_until_ok(step, f"{name} after killing {victim}")
        call_until_ok(seq.delete, "delete")


def test_every_step_is_idempotent_three_times(stack: DevStack, tmp_path: Path) -> None:
    with CsiClient(stack.info.csi_endpoint) as csi:
        seq = Sequence(csi, stack.node_id, tmp_path / "work", "mount")
        for name, step in seq.steps():
            if name in ("write", "verify"):
                step()
                continue
            answers = [step() for _ in range(3)]
            assert answers[0] == answers[1] == answers[2], name
        seq.delete()
