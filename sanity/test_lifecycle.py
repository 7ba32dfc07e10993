"""Whole volume lifecycles, the way Kubernetes drives them, checked by what a pod sees."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest

from sanity.support import (
    NODE_ID,
    READ_ONLY_ERRNOS,
    Code,
    Csi,
    Kind,
    MiB,
    block_device_size,
    can_grow_ext4_online,
    capacity,
    csi_pb2,
    filesystem_size,
    is_block_device,
    mount_cap,
    mounts_at,
    payload,
    read_digest,
    write_data,
    write_error,
)

T = 180


def assert_serves(kind: Kind, target: Path, size: int) -> None:
    """What a pod finds at target: the filesystem asked for, or a block device of the size."""
    if kind.is_block:
        assert is_block_device(target), f"{target} should be a block device"
        assert block_device_size(target) == size
        return
    found = mounts_at(target)
    assert len(found) == 1, f"expected one mount at {target}, found {found}"
    assert found[0].fstype == kind.name
    assert not found[0].read_only
    # the filesystem takes some space for itself, never more than the volume
    assert size // 2 < filesystem_size(target) <= size


def test_data_survives_a_full_unpublish_and_republish_cycle(csi: Csi, fs_kind: Kind) -> None:
    volume = csi.create_volume(fs_kind)
    pub = csi.publish_all(volume, fs_kind)
    assert_serves(fs_kind, pub.target, volume.capacity_bytes)
    data, digest = payload()
    write_data(fs_kind, pub.target, data)
    csi.unpublish_all(pub)
    assert not mounts_at(pub.staging) and not mounts_at(pub.target)

    again = csi.publish_all(volume, fs_kind)
    assert_serves(fs_kind, again.target, volume.capacity_bytes)
    assert read_digest(fs_kind, again.target) == digest, "the data did not survive"
    csi.unpublish_all(again)
    csi.delete_volume(volume.volume_id)


def test_every_step_three_times_in_a_row_gives_the_same_answer(csi: Csi, kind: Kind) -> None:
    req = csi_pb2.CreateVolumeRequest(
        name=f"sanity-thrice-{kind}-{os.getpid()}-{time.monotonic_ns()}",
        capacity_range=capacity(kind.size),
        volume_capabilities=[kind.cap()],
    )
    volumes = [csi.create(req).volume for _ in range(3)]
    assert volumes[0] == volumes[1] == volumes[2]
    volume = volumes[0]
    cap = kind.cap()

    contexts = [csi.controller_publish(volume.volume_id, cap) for _ in range(3)]
    assert contexts[0] == contexts[1] == contexts[2]
    ctx = contexts[0]

    staging = csi.staging_dir()
    for _ in range(3):
        csi.stage(volume, cap, ctx, staging)
    if not kind.is_block:
        assert len(mounts_at(staging)) == 1, "staging again must not stack mounts"

    target = csi.path("target")
    for _ in range(3):
        csi.node_publish(volume, cap, ctx, staging, target)
    assert len(mounts_at(target)) == 1, "publishing again must not stack mounts"
    assert_serves(kind, target, volume.capacity_bytes)

    for _ in range(3):
        csi.unpublish(volume.volume_id, target)
    assert not mounts_at(target) and not os.path.lexists(target)
    for _ in range(3):
        csi.unstage(volume.volume_id, staging)
    assert not mounts_at(staging)
    for _ in range(3):
        csi.controller_unpublish(volume.volume_id)
    for _ in range(3):
        csi.delete_volume(volume.volume_id)


def test_a_blank_filesystem_type_means_ext4(csi: Csi) -> None:
    kind = Kind("ext4")
    volume = csi.create_volume(kind, caps=[mount_cap("")])
    pub = csi.publish_all(volume, kind, cap=mount_cap(""))
    assert [m.fstype for m in mounts_at(pub.target)] == ["ext4"]


def test_mount_flags_reach_the_pod_mount(csi: Csi, mount_fs_kind: Kind) -> None:
    volume = csi.create_volume(mount_fs_kind)
    pub = csi.publish_all(volume, mount_fs_kind, flags=["noatime"])
    found = mounts_at(pub.target)
    assert found and "noatime" in found[0].options, found


def test_a_read_only_publish_refuses_writes_while_the_pod_next_door_writes(
    csi: Csi, kind: Kind
) -> None:
    volume = csi.create_volume(kind)
    pub = csi.publish_all(volume, kind)
    # A block target gets a device the kernel keeps read-only (a read-only
    # bind of the writable device node would still take writes).
    ro_target = csi.node_publish(volume, pub.cap, pub.publish_context, pub.staging, readonly=True)
    assert all(m.read_only for m in mounts_at(ro_target)), mounts_at(ro_target)
    failure = write_error(kind, ro_target)
    refusals = READ_ONLY_ERRNOS if kind.is_block else {errno.EROFS}
    assert failure in refusals, f"a write through a read-only publish gave errno {failure}"
    data, digest = payload()
    write_data(kind, pub.target, data)
    assert read_digest(kind, ro_target) == digest


def grow(csi: Csi, volume: csi_pb2.Volume, pub_cap: csi_pb2.VolumeCapability, new_size: int
         ) -> csi_pb2.ControllerExpandVolumeResponse:  # fmt: skip
    reply = csi.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id,
            capacity_range=capacity(new_size),
            volume_capability=pub_cap,
        ),
        timeout=T,
    )
    assert reply.capacity_bytes >= new_size
    return reply


def test_growing_a_published_volume_grows_what_the_pod_sees(csi: Csi, fs_kind: Kind) -> None:
    if fs_kind.name == "ext4" and not can_grow_ext4_online():
        pytest.skip("this machine drops CAP_SYS_RESOURCE, which online ext4 growth needs")
    volume = csi.create_volume(fs_kind)
    pub = csi.publish_all(volume, fs_kind)
    data, digest = payload()
    write_data(fs_kind, pub.target, data)
    old_fs = 0 if fs_kind.is_block else filesystem_size(pub.target)

    new_size = volume.capacity_bytes + 256 * MiB
    reply = grow(csi, volume, pub.cap, new_size)
    if not fs_kind.is_block:
        assert reply.node_expansion_required, "a filesystem must be grown on the node"

    req = csi_pb2.NodeExpandVolumeRequest(
        volume_id=volume.volume_id,
        volume_path=str(pub.target),
        staging_target_path=str(pub.staging),
        capacity_range=capacity(new_size),
        volume_capability=pub.cap,
    )
    answers = [csi.node.NodeExpandVolume(req, timeout=T) for _ in range(3)]
    assert answers[0] == answers[1] == answers[2]
    if answers[0].capacity_bytes:
        assert answers[0].capacity_bytes >= new_size

    if fs_kind.is_block:
        assert block_device_size(pub.target) == reply.capacity_bytes
    else:
        grown = filesystem_size(pub.target)
        assert grown >= old_fs + (reply.capacity_bytes - volume.capacity_bytes) * 9 // 10, (
            f"statvfs shows {grown} bytes after growing from {old_fs}"
        )
    assert read_digest(fs_kind, pub.target) == digest, "growing must not touch the data"
    got = csi.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id), timeout=T
    )
    assert got.volume.capacity_bytes == reply.capacity_bytes


def test_an_xfs_volume_staged_as_ext4_is_refused_and_keeps_its_data(csi: Csi) -> None:
    xfs, ext4 = Kind("xfs"), Kind("ext4")
    volume = csi.create_volume(xfs)
    pub = csi.publish_all(volume, xfs)
    data, digest = payload()
    write_data(xfs, pub.target, data)
    csi.unpublish_all(pub)

    # the controller knows the volume is xfs (and refuses an ext4 publish); the node
    # must defend itself too, from what is on the disk: ask it for ext4 directly
    ctx = csi.controller_publish(volume.volume_id, xfs.cap())
    staging = csi.staging_dir()
    req = csi_pb2.NodeStageVolumeRequest(
        volume_id=volume.volume_id,
        publish_context=ctx,
        staging_target_path=str(staging),
        volume_capability=ext4.cap(),
        volume_context=dict(volume.volume_context),
    )
    csi.expect(csi.node.NodeStageVolume, req, Code.FAILED_PRECONDITION, "xfs")
    assert not mounts_at(staging), "a refused stage must leave nothing mounted"
    csi.unstage(volume.volume_id, staging)
    csi.controller_unpublish(volume.volume_id)

    again = csi.publish_all(volume, xfs)
    assert [m.fstype for m in mounts_at(again.target)] == ["xfs"], "never reformat"
    assert read_digest(xfs, again.target) == digest


def test_publishing_after_the_staging_mount_vanished_is_refused(csi: Csi, mount_kind: Kind) -> None:
    volume = csi.create_volume(mount_kind)
    cap = mount_kind.cap()
    ctx = csi.controller_publish(volume.volume_id, cap)
    staging = csi.stage(volume, cap, ctx)
    assert mounts_at(staging), "NodeStage should have mounted the volume at the staging path"
    while mounts_at(staging):  # an admin, a reboot, a crashed node plugin...
        subprocess.run(["umount", str(staging)], check=True, timeout=60)

    target = csi.path("target")
    req = csi_pb2.NodePublishVolumeRequest(
        volume_id=volume.volume_id,
        publish_context=ctx,
        staging_target_path=str(staging),
        target_path=str(target),
        volume_capability=cap,
        volume_context=dict(volume.volume_context),
    )
    csi.expect(csi.node.NodePublishVolume, req, Code.FAILED_PRECONDITION)
    assert not mounts_at(target), "the pod must not get the empty staging directory"

    # kubelet's recovery: stage again, then publish
    csi.stage(volume, cap, ctx, staging)
    target = csi.node_publish(volume, cap, ctx, staging, target)
    assert_serves(mount_kind, target, volume.capacity_bytes)


def test_a_volume_on_the_node_shows_up_under_dev_tessera(csi: Csi, kind: Kind) -> None:
    volume, pub = csi.provision(kind)
    device = Path("/dev/tessera") / volume.volume_id
    assert is_block_device(device), f"{device} should lead to the attached block device"
    assert block_device_size(device) == volume.capacity_bytes
    csi.unpublish_all(pub)
    assert not os.path.lexists(device), "detaching should remove the device link"
    assert pub.node_id == NODE_ID
