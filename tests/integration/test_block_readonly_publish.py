"""Read-only publish of a block volume staged writable, through the agent's read-only view.

A read-only bind of a writable device node does not stop writes to the
device (the pod opens the node and writes); NodePublishVolume with
readonly=true used to answer FAILED_PRECONDITION forever instead. Now the
target gets a device the kernel keeps read-only: a second loop device on
the same volume file. Real agent process, real CSI node service over gRPC,
real loop devices and bind mounts.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from csi_driver._gen import csi_pb2
from csi_driver.config import Mode, PluginConfig
from csi_driver.server import build_server
from tessera.clients import AgentClient
from tessera.errors import FailedPrecondition, InvalidArgument
from tessera.ids import new_volume_id
from tessera.system import loopdev, mounts
from tessera_dev.csi_client import CsiClient, block_capability
from tests.conftest import needs_root
from tests.integration.test_node_agent_loop import release_loops
from tests.integration.test_node_agent_process import TOKEN, AgentProcess

pytestmark = [needs_root, pytest.mark.root]
MiB = 1024**2
BLOCK = 4096
REFUSED = (errno.EPERM, errno.EROFS, errno.EACCES)


@dataclass
class Node:
    agent_proc: AgentProcess
    agent: AgentClient
    csi: CsiClient

    def restart_agent(self) -> None:
        self.agent.close()
        self.agent_proc.stop(signal.SIGKILL)
        self.agent = self.agent_proc.start()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    proc = AgentProcess(tmp_path)
    agent = proc.start()
    config = PluginConfig(
        mode=Mode.NODE,
        endpoint=f"unix://{tmp_path / 'csi.sock'}",
        node_id="proc-node",
        token=TOKEN,
        agent_url=f"unix://{proc.socket}",
    )
    server = build_server(config)
    server.start()
    csi = CsiClient(config.endpoint)
    n = Node(proc, agent, csi)
    try:
        yield n
    finally:
        csi.channel.close()
        server.stop(None).wait()
        n.agent.close()
        for target in reversed(mounts.mounts_under(tmp_path)):
            mounts.unmount(target)
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop(signal.SIGTERM)
        release_loops(tmp_path)
    assert loopdev.bound_under(tmp_path) == []


def aligned(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, BLOCK)
    buf.write(data.ljust(BLOCK, b"\0"))
    return buf


def write_block(path: Path, data: bytes, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        os.pwritev(fd, [aligned(data)], offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_block(path: Path, offset: int) -> bytes:
    """O_DIRECT: each device has its own page cache; bypass it to see the file."""
    buf = mmap.mmap(-1, BLOCK)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        os.preadv(fd, [buf], offset)
    finally:
        os.close(fd)
    return bytes(buf)


def write_is_refused(path: Path) -> int:
    """The errno a write through path fails with (open, write or flush may refuse)."""
    try:
        write_block(path, b"must not land", 0)
    except OSError as exc:
        return exc.errno or 0
    return 0


def publish(node: Node, vid: str, staging: Path, target: Path, readonly: bool) -> None:
    node.csi.node.NodePublishVolume(
        csi_pb2.NodePublishVolumeRequest(
            volume_id=vid,
            staging_target_path=str(staging),
            target_path=str(target),
            volume_capability=block_capability(),
            readonly=readonly,
        )
    )


def unpublish(node: Node, vid: str, target: Path) -> None:
    node.csi.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target))
    )


def test_read_only_block_publish_of_a_writable_volume_cannot_write_and_sees_the_writer(
    node: Node,
) -> None:
    tmp = node.agent_proc.tmp
    vid = new_volume_id()
    node.agent.create_volume(vid, "default", 16 * MiB)
    staging = tmp / "staging"
    staging.mkdir()
    node.csi.node.NodeStageVolume(
        csi_pb2.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=str(staging), volume_capability=block_capability()
        )
    )
    primary = node.agent.get_attachment(vid).backing_device
    write_block(Path(primary), b"written before publishing", 0)
    ro, rw = tmp / "pods" / "reader" / "dev", tmp / "pods" / "writer" / "dev"
    publish(node, vid, staging, ro, readonly=True)
    publish(node, vid, staging, rw, readonly=False)
    publish(node, vid, staging, ro, readonly=True)  # a retry converges on the same view

    views = node.agent.get_attachment(vid).views
    assert len(views) == 1 and primary not in views.values()
    listed = node.agent.list_attachments()
    assert [(a.volume_id, a.backing_device) for a in listed] == [(vid, primary)], "one per volume"
    assert write_is_refused(ro) in REFUSED
    assert read_block(rw, 0).startswith(b"written before publishing"), "data untouched"
    write_block(rw, b"written by the writer pod", MiB)
    assert read_block(ro, MiB).startswith(b"written by the writer pod")

    # The view survives an agent restart as a view, even with the symlink gone.
    (tmp / "dev" / vid).unlink()
    node.restart_agent()
    after = node.agent.get_attachment(vid)
    assert after.backing_device == primary and after.views == views
    assert os.readlink(tmp / "dev" / vid) == primary
    publish(node, vid, staging, ro, readonly=True)  # still recognised as published
    assert write_is_refused(ro) in REFUSED

    unpublish(node, vid, ro)
    assert node.agent.get_attachment(vid).views == {}, "unpublish releases the view"
    assert [b.path for b in loopdev.bound_under(tmp)] == [primary]
    unpublish(node, vid, rw)
    unpublish(node, vid, ro)  # again: nothing to do
    node.csi.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging))
    )
    assert loopdev.bound_under(tmp) == []
    node.agent.delete_volume(vid)


def test_unstage_is_refused_while_a_read_only_view_is_still_published(node: Node) -> None:
    tmp = node.agent_proc.tmp
    vid = new_volume_id()
    node.agent.create_volume(vid, "default", 16 * MiB)
    staging = tmp / "staging"
    staging.mkdir()
    node.csi.node.NodeStageVolume(
        csi_pb2.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=str(staging), volume_capability=block_capability()
        )
    )
    ro = tmp / "pods" / "reader" / "dev"
    publish(node, vid, staging, ro, readonly=True)
    unstage = csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging))
    with pytest.raises(grpc.RpcError) as err:
        node.csi.node.NodeUnstageVolume(unstage)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert str(ro) in (err.value.details() or "")
    # Behind the plugin's back, the agent refuses too: the view is bound at ro.
    with pytest.raises(FailedPrecondition, match=str(ro)):
        node.agent.detach(vid)
    unpublish(node, vid, ro)
    node.csi.node.NodeUnstageVolume(unstage)
    assert loopdev.bound_under(tmp) == []
    node.agent.delete_volume(vid)


def test_a_view_key_of_the_wrong_form_is_refused_naming_the_field(node: Node) -> None:
    vid = new_volume_id()
    node.agent.create_volume(vid, "default", 16 * MiB)
    node.agent.attach(vid)
    with pytest.raises(InvalidArgument) as err:
        node.agent.attach_view(vid, "Not_A_Key")
    assert err.value.field == "view_key"
    node.agent.detach(vid)
    node.agent.delete_volume(vid)
