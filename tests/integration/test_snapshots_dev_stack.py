"""Snapshots, group snapshots and clones on the real dev stack: management, a node-agent on
the dev pool (an XFS image made with reflink) and the CSI plugin, with real loop devices,
ext4 filesystems and mounts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver._gen import csi_pb2
from tessera.clients import ManagementClient
from tessera.errors import TesseraError
from tessera.models import ContentSource, GroupSnapshotCreate, SnapshotCreate, VolumeCreate
from tessera.system.loopdev import bound_under
from tessera.system.mounts import mounts_under
from tessera_dev.csi_client import CsiClient, mount_capability
from tessera_dev.stack import DevStack, StackInfo
from tests.conftest import needs_root

MiB = 1024**2

#: appends numbered lines to a file as fast as it can until killed
WRITER = """
import sys
n = 0
with open(sys.argv[1], "a") as f:
    while True:
        f.write(f"{n:08d}\\n")
        n += 1
        if n % 64 == 0:
            f.flush()
"""


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[tuple[StackInfo, ManagementClient]]:
    state = Path(tempfile.mkdtemp(prefix="tsnap-"))  # unix socket paths stay short
    stack = DevStack(state, pool_size=1024**3, node_id="snap-node")
    try:
        info = stack.start()
        client = ManagementClient(info.management_url, Path(info.token_file).read_text().strip())
        try:
            yield info, client
        finally:
            client.close()
    finally:
        stack.stop()
        left = mounts_under(tmp_path) + mounts_under(state)
        assert left == [] and bound_under(state) == [], left
        shutil.rmtree(state)  # nothing is mounted under it (checked just above)


def pool_allocated(client: ManagementClient) -> int:
    return sum(p.allocated_bytes for p in client.list_pools().items)


@needs_root
def test_dev_pool_snapshots_by_reflink_and_deletes_in_any_order_return_the_space(dev) -> None:
    info, client = dev
    assert [p.snapshot_method.value for p in client.list_pools().items] == ["reflink"]
    empty = pool_allocated(client)
    vol = client.create_volume(VolumeCreate(name="src", size_bytes=32 * MiB))
    path = Path(info.pool_dir) / "volumes" / f"{vol.id}.img"
    data = os.urandom(4 * MiB)
    with open(path, "r+b") as f:
        f.write(data)
        os.fsync(f.fileno())
    want = hashlib.sha256(data).hexdigest()
    for order in (("volume", "snapshot", "clone"), ("clone", "snapshot", "volume")):
        if order[0] == "clone":  # the second round: a fresh source with the same data
            vol = client.create_volume(VolumeCreate(name="src2", size_bytes=32 * MiB))
            path = Path(info.pool_dir) / "volumes" / f"{vol.id}.img"
            with open(path, "r+b") as f:
                f.write(data)
                os.fsync(f.fileno())
        snap = client.create_snapshot(SnapshotCreate(name=f"s-{order[0]}", source_volume_id=vol.id))
        assert snap.method.value == "reflink" and snap.ready_to_use
        assert snap.allocated_bytes >= 4 * MiB
        snap_file = Path(info.pool_dir) / "snapshots" / snap.id
        with open(path, "r+b") as f:  # the source moves on; the snapshot keeps its data
            f.write(b"\0" * len(data))
        assert hashlib.sha256(snap_file.read_bytes()[: len(data)]).hexdigest() == want
        clone = client.create_volume(
            VolumeCreate(
                name=f"c-{order[0]}",
                size_bytes=64 * MiB,
                content_source=ContentSource(snapshot_id=snap.id),
            )
        )
        clone_file = Path(info.pool_dir) / "volumes" / f"{clone.id}.img"
        assert clone_file.stat().st_size == 64 * MiB
        assert hashlib.sha256(clone_file.read_bytes()[: len(data)]).hexdigest() == want
        assert pool_allocated(client) == empty + 32 * MiB + 64 * MiB + snap.allocated_bytes
        delete = {
            "volume": lambda v=vol: client.delete_volume(v.id),
            "snapshot": lambda s=snap: client.delete_snapshot(s.id),
            "clone": lambda c=clone: client.delete_volume(c.id),
        }
        for what in order:
            delete[what]()
        assert pool_allocated(client) == empty
        assert not list((Path(info.pool_dir) / "snapshots").iterdir())


def stage(csi: CsiClient, node_id: str, volume_id: str, staging: Path) -> None:
    """ControllerPublish (management records the attachment), then NodeStage, as a CO does."""
    published = csi.controller.ControllerPublishVolume(
        csi_pb2.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=node_id, volume_capability=mount_capability("ext4")
        ),
        timeout=60,
    )
    csi.node.NodeStageVolume(
        csi_pb2.NodeStageVolumeRequest(
            volume_id=volume_id,
            staging_target_path=str(staging),
            volume_capability=mount_capability("ext4"),
            publish_context=published.publish_context,
        ),
        timeout=60,
    )


def unstage(csi: CsiClient, node_id: str, volume_id: str, staging: Path) -> None:
    csi.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging)),
        timeout=60,
    )
    csi.controller.ControllerUnpublishVolume(
        csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=node_id),
        timeout=60,
    )


def log_lines(image: Path) -> list[str]:
    """The writer's log as the snapshot's filesystem holds it (debugfs: no mount needed)."""
    out = subprocess.run(
        ["debugfs", "-R", "cat /log", str(image)], capture_output=True, check=True, timeout=60
    ).stdout.decode()
    return out.splitlines()


@needs_root
def test_group_snapshot_of_three_mounted_volumes_being_written_is_consistent(
    dev, tmp_path: Path
) -> None:
    """Every member is a clean filesystem (frozen for the cut) whose log is whole lines."""
    info, client = dev
    staged: list[tuple[str, Path]] = []
    writers: list[subprocess.Popen[bytes]] = []
    with CsiClient(info.csi_endpoint) as csi:
        try:
            for i in range(3):
                vol = csi.controller.CreateVolume(
                    csi_pb2.CreateVolumeRequest(
                        name=f"g-{i}",
                        capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
                        volume_capabilities=[mount_capability("ext4")],
                    ),
                    timeout=60,
                ).volume
                staging = tmp_path / f"st{i}"
                staging.mkdir()
                stage(csi, info.node_id, vol.volume_id, staging)
                staged.append((vol.volume_id, staging))
                writers.append(
                    subprocess.Popen([sys.executable, "-c", WRITER, str(staging / "log")])
                )
            time.sleep(1)  # all three are writing
            group = client.create_group_snapshot(
                GroupSnapshotCreate(name="g", source_volume_ids=[v for v, _ in staged])
            )
            for w in writers:
                w.kill()
                w.wait()
            assert group.ready_to_use and len(group.snapshots) == 3
            for member in group.snapshots:
                image = Path(info.pool_dir) / "snapshots" / member.id
                fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True)
                assert fsck.returncode == 0, fsck.stdout.decode() + fsck.stderr.decode()
                lines = log_lines(image)
                assert lines, "the writer had written before the cut"
                assert lines == [f"{n:08d}" for n in range(len(lines))]
            # all frozen, all thawed: the volumes still take writes
            for _, staging in staged:
                (staging / "after").write_text("thawed")
            client.delete_group_snapshot(group.id)
            assert client.list_snapshots().items == []
        finally:
            for w in writers:
                if w.poll() is None:
                    w.kill()
                    w.wait()
            for volume_id, staging in staged:
                unstage(csi, info.node_id, volume_id, staging)
                client.delete_volume(volume_id)


@needs_root
def test_a_cut_that_fails_still_thaws_the_mounted_filesystem(dev, tmp_path: Path) -> None:
    """The agent cannot write the snapshot file (its directory made immutable): the create
    fails, and the volume's filesystem takes an fsync'd write at once, long before the
    freeze's lease would have thawed it."""
    info, client = dev
    snapdir = Path(info.pool_dir) / "snapshots"
    staging = tmp_path / "st"
    staging.mkdir()
    with CsiClient(info.csi_endpoint) as csi:
        vol = csi.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name="thaw-me",
                capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
                volume_capabilities=[mount_capability("ext4")],
            ),
            timeout=60,
        ).volume
        stage(csi, info.node_id, vol.volume_id, staging)
        try:
            first = client.create_snapshot(
                SnapshotCreate(name="ok", source_volume_id=vol.volume_id)
            )
            client.delete_snapshot(first.id)  # the directory exists, and is empty
            subprocess.run(["chattr", "+i", str(snapdir)], check=True)
            try:
                with pytest.raises(TesseraError):
                    client.create_snapshot(
                        SnapshotCreate(name="fails", source_volume_id=vol.volume_id)
                    )
                write = [
                    sys.executable,
                    "-c",
                    "import os, sys; fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT); "
                    "os.write(fd, b'x'); os.fsync(fd)",
                    str(staging / "after"),
                ]
                # frozen, this would block until the agent's 10 s lease ran out
                subprocess.run(write, check=True, timeout=5)
            finally:
                subprocess.run(["chattr", "-i", str(snapdir)], check=True)
            listed = client.list_snapshots(name="fails").items
            assert [s.state.value for s in listed] == ["creating"]  # re-driven by a retry
            again = client.create_snapshot(
                SnapshotCreate(name="fails", source_volume_id=vol.volume_id)
            )
            assert again.ready_to_use and again.id == listed[0].id
            client.delete_snapshot(again.id)
        finally:
            unstage(csi, info.node_id, vol.volume_id, staging)
            client.delete_volume(vol.volume_id)
