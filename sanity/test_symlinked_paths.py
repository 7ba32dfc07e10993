"""Kubelet's directory behind a symlink: every node RPC converges on paths under one.

Some distributions put /var/lib/kubelet behind a symlink, so every staging
and target path the plugin gets crosses it, while the kernel's mount table
lists the resolved path. Each RPC below is sent twice (kubelet retries
everything), with the second request spelling the path differently (a
doubled slash), and each must answer OK; at the end nothing is left
mounted or lying around, under the symlink or under the real directory.

A staging or target path that is itself a symlink is never followed: the
plugin refuses to mount through it, and unpublishing it removes the link,
never what it points to.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sanity.support import (
    Code,
    Csi,
    Kind,
    MiB,
    can_grow_ext4_online,
    capacity,
    csi_pb2,
    mounts_at,
    mounts_under,
    payload,
    read_digest,
    write_data,
)

T = 180


class LinkedDirs:
    """<workdir>/real, and <workdir>/kubelet -> real: what such a distribution looks like."""

    def __init__(self, csi: Csi) -> None:
        self.real = csi.workdir / "real"
        self.real.mkdir()
        self.link = csi.workdir / "kubelet"
        self.link.symlink_to(self.real, target_is_directory=True)

    def respelled(self, path: Path) -> str:
        """The same path with a doubled slash after the symlink, as a sloppy join writes it."""
        return str(path).replace(str(self.link) + "/", str(self.link) + "//", 1)


@pytest.fixture
def dirs(csi: Csi) -> LinkedDirs:
    return LinkedDirs(csi)


def stage_request(volume: csi_pb2.Volume, cap: csi_pb2.VolumeCapability, ctx: dict[str, str],
                  staging: str) -> csi_pb2.NodeStageVolumeRequest:  # fmt: skip
    return csi_pb2.NodeStageVolumeRequest(
        volume_id=volume.volume_id,
        publish_context=ctx,
        staging_target_path=staging,
        volume_capability=cap,
        volume_context=dict(volume.volume_context),
    )


def publish_request(volume: csi_pb2.Volume, cap: csi_pb2.VolumeCapability, ctx: dict[str, str],
                    staging: str, target: str) -> csi_pb2.NodePublishVolumeRequest:  # fmt: skip
    return csi_pb2.NodePublishVolumeRequest(
        volume_id=volume.volume_id,
        publish_context=ctx,
        staging_target_path=staging,
        target_path=target,
        volume_capability=cap,
        volume_context=dict(volume.volume_context),
    )


def test_every_node_rpc_converges_on_paths_under_a_symlinked_kubelet_dir(
    csi: Csi, dirs: LinkedDirs, kind: Kind
) -> None:
    volume = csi.create_volume(kind)
    cap = kind.cap()
    ctx = csi.controller_publish(volume.volume_id, cap)
    staging = dirs.link / "staging"
    staging.mkdir()  # the CO creates the staging directory
    target = dirs.link / "target"

    # stage twice
    csi.stage(volume, cap, ctx, staging)
    csi.node.NodeStageVolume(stage_request(volume, cap, ctx, dirs.respelled(staging)), timeout=T)
    if not kind.is_block:
        assert len(mounts_at(dirs.real / "staging")) == 1, "a retry must not mount twice"

    # publish twice
    csi.node_publish(volume, cap, ctx, staging, target)
    csi.node.NodePublishVolume(
        publish_request(volume, cap, ctx, dirs.respelled(staging), dirs.respelled(target)),
        timeout=T,
    )
    assert len(mounts_at(dirs.real / "target")) == 1, "a retry must not publish twice"
    data, digest = payload(MiB)
    write_data(kind, target, data)
    assert read_digest(kind, dirs.real / "target", MiB) == digest

    # stats, through the symlink and at the staging mount
    reply = csi.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume.volume_id, volume_path=str(target)),
        timeout=T,
    )
    total = {u.unit: u.total for u in reply.usage}[csi_pb2.VolumeUsage.BYTES]
    assert 0 < total <= volume.capacity_bytes
    assert not reply.volume_condition.abnormal, reply.volume_condition.message
    if not kind.is_block:
        csi.node.NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(
                volume_id=volume.volume_id, volume_path=dirs.respelled(staging)
            ),
            timeout=T,
        )

    # expand, twice
    size = volume.capacity_bytes
    if kind.is_block or can_grow_ext4_online():
        size += 64 * MiB
        csi.controller.ControllerExpandVolume(
            csi_pb2.ControllerExpandVolumeRequest(
                volume_id=volume.volume_id, capacity_range=capacity(size), volume_capability=cap
            ),
            timeout=T,
        )
    for path in (str(target), dirs.respelled(target)):
        grown = csi.node.NodeExpandVolume(
            csi_pb2.NodeExpandVolumeRequest(
                volume_id=volume.volume_id,
                volume_path=path,
                staging_target_path=str(staging),
                capacity_range=capacity(size),
                volume_capability=cap,
            ),
            timeout=T,
        )
        assert grown.capacity_bytes >= size
    assert read_digest(kind, target, MiB) == digest

    # unpublish twice, unstage twice
    csi.unpublish(volume.volume_id, target)
    csi.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume.volume_id, target_path=dirs.respelled(target)
        ),
        timeout=T,
    )
    assert not os.path.lexists(dirs.real / "target"), "the SP MUST delete what it created"
    csi.unstage(volume.volume_id, staging)
    csi.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume.volume_id, staging_target_path=dirs.respelled(staging)
        ),
        timeout=T,
    )
    assert not mounts_under(dirs.real), [m.mount_point for m in mounts_under(dirs.real)]
    assert not os.path.lexists(f"/dev/tessera/{volume.volume_id}"), "the device stayed attached"
    assert dirs.link.is_symlink() and dirs.real.is_dir(), "the kubelet directory was touched"


def test_a_target_that_is_itself_a_symlink_is_never_mounted_through(
    csi: Csi, dirs: LinkedDirs, mount_kind: Kind
) -> None:
    volume, pub = csi.provision(mount_kind)
    elsewhere = dirs.real / "elsewhere"
    elsewhere.mkdir()
    sneaky = dirs.link / "sneaky-target"
    sneaky.symlink_to(elsewhere, target_is_directory=True)
    req = publish_request(volume, pub.cap, pub.publish_context, str(pub.staging), str(sneaky))
    csi.expect(csi.node.NodePublishVolume, req, Code.INVALID_ARGUMENT, "target_path", "symlink")
    assert not mounts_at(elsewhere), "the mount went where the symlink points"


def test_unpublishing_a_symlink_to_a_live_mount_removes_the_link_and_leaves_the_mount(
    csi: Csi, dirs: LinkedDirs, kind: Kind
) -> None:
    volume, pub = csi.provision(kind)
    sneaky = dirs.link / "points-at-a-pod"
    sneaky.symlink_to(pub.target)
    csi.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=str(sneaky)),
        timeout=T,
    )
    assert not os.path.lexists(sneaky)
    assert mounts_at(pub.target), "unpublishing a symlink unmounted what it pointed to"
    assert os.path.lexists(pub.target)


@pytest.mark.parametrize("shape", ["same", "under", "around"])
def test_publishing_onto_the_staging_path_spelled_past_the_symlink_is_refused_and_keeps_it_staged(
    csi: Csi, dirs: LinkedDirs, kind: Kind, shape: str
) -> None:
    # reviewer's example: staging kubelet/staging, target real/staging: answered OK
    # ("published already"), and the NodeUnpublish that followed unstaged the volume
    volume = csi.create_volume(kind)
    cap = kind.cap()
    ctx = csi.controller_publish(volume.volume_id, cap)
    staging = dirs.link / "pod" / "staging"
    staging.mkdir(parents=True)
    csi.stage(volume, cap, ctx, staging)
    real_staging = dirs.real / "pod" / "staging"
    target = {
        "same": real_staging,
        "under": real_staging / "inside",  # a bind into the staging mount
        "around": dirs.real / "pod",  # a bind over the directory holding it
    }[shape]
    req = publish_request(volume, cap, ctx, str(staging), str(target))
    csi.expect(csi.node.NodePublishVolume, req, Code.INVALID_ARGUMENT, "target_path")
    assert not mounts_at(target) or target == real_staging, "the refused publish mounted"
    assert real_staging.is_dir(), "the staging directory was replaced"
    if not kind.is_block:
        assert len(mounts_at(real_staging)) == 1, "the volume must still be staged, once"
    csi.node_publish(volume, cap, ctx, staging)  # and it still publishes
