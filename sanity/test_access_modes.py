"""The access-mode matrix of ARCHITECTURE.md, as pods on one or two nodes see it.

| CSI mode                              | block                 | filesystem           |
|---------------------------------------|-----------------------|----------------------|
| SINGLE_NODE_WRITER / _MULTI_WRITER    | yes                   | yes                  |
| SINGLE_NODE_SINGLE_WRITER (RWOP)      | one publish only      | one publish only     |
| SINGLE_NODE_READER_ONLY, MULTI_NODE_READER_ONLY | read-only   | mounted read-only    |
| MULTI_NODE_SINGLE_WRITER              | one writer node, others read-only | refused |
| MULTI_NODE_MULTI_WRITER               | yes                   | refused, clearly     |

The second node is registered with management over REST and has no agent:
it is enough for the controller's cross-node decisions.
"""

from __future__ import annotations

import errno

import pytest

from sanity.conftest import SecondNode
from sanity.support import (
    MAX_VOLUMES_PER_NODE,
    NODE_ID,
    Code,
    Csi,
    Kind,
    MiB,
    block_cap,
    capacity,
    csi_pb2,
    mount_cap,
    mounts_at,
    payload,
    read_digest,
    unique_name,
    write_data,
    write_error,
)

READ_ONLY_MODES = ["SINGLE_NODE_READER_ONLY", "MULTI_NODE_READER_ONLY"]
SINGLE_NODE_MODES = [
    "SINGLE_NODE_WRITER",
    "SINGLE_NODE_MULTI_WRITER",
    "SINGLE_NODE_SINGLE_WRITER",
    "SINGLE_NODE_READER_ONLY",
]


def publish_request(
    volume_id: str, cap: csi_pb2.VolumeCapability, node_id: str, readonly: bool = False
) -> csi_pb2.ControllerPublishVolumeRequest:
    return csi_pb2.ControllerPublishVolumeRequest(
        volume_id=volume_id, node_id=node_id, volume_capability=cap, readonly=readonly
    )


# ---- MULTI_NODE_MULTI_WRITER -------------------------------------------------------------


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
@pytest.mark.parametrize(
    "mode",
    [
        "MULTI_NODE_MULTI_WRITER",  # ext4/xfs are not cluster filesystems
        "MULTI_NODE_SINGLE_WRITER",  # readers on other nodes would see torn metadata
    ],
)
def test_multi_node_writer_filesystems_are_refused_with_a_clear_message(
    csi: Csi, fs_type: str, mode: str
) -> None:
    req = csi_pb2.CreateVolumeRequest(
        name=unique_name("mnw"),
        capacity_range=capacity(512 * MiB),
        volume_capabilities=[mount_cap(fs_type, mode)],
    )
    message = csi.expect(csi.controller.CreateVolume, req, Code.INVALID_ARGUMENT, mode)
    assert "block" in message.lower(), f"tell the user block volumes can do it: {message!r}"


def test_multi_node_multi_writer_is_not_confirmed_for_a_filesystem(csi: Csi) -> None:
    volume = csi.create_volume(Kind("block"), mode="MULTI_NODE_MULTI_WRITER")
    req = csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=volume.volume_id,
        volume_capabilities=[mount_cap("ext4", "MULTI_NODE_MULTI_WRITER")],
    )
    reply = csi.controller.ValidateVolumeCapabilities(req, timeout=60)
    assert not reply.HasField("confirmed"), "ext4 is not a cluster filesystem"
    assert reply.message, "say why the capability is not supported"


def test_multi_node_multi_writer_block_volumes_are_shared_by_pods_and_nodes(
    csi: Csi, block_kind: Kind, second_node: SecondNode
) -> None:
    mode = "MULTI_NODE_MULTI_WRITER"
    volume, pub = csi.provision(block_kind, mode)
    other = csi.node_publish(volume, pub.cap, pub.publish_context, pub.staging)
    data, digest = payload()
    write_data(block_kind, pub.target, data)
    assert read_digest(block_kind, other) == digest
    assert write_error(block_kind, other) is None, "every writer may write"
    second_node.heartbeat()
    csi.controller_publish(volume.volume_id, pub.cap, node_id=second_node.id)


# ---- reader-only modes -------------------------------------------------------------------


@pytest.mark.parametrize("mode", READ_ONLY_MODES)
def test_reader_only_modes_publish_read_only_with_the_data_intact(
    csi: Csi, kind: Kind, mode: str
) -> None:
    volume = csi.create_volume(kind, caps=[kind.cap(), kind.cap(mode)])
    writer = csi.publish_all(volume, kind)
    data, digest = payload()
    write_data(kind, writer.target, data)
    csi.unpublish_all(writer)

    # readonly=False on purpose: the mode alone must make it read-only
    reader = csi.publish_all(volume, kind, mode)
    assert read_digest(kind, reader.target) == digest
    failure = write_error(kind, reader.target)
    if kind.is_block:
        assert failure in (errno.EROFS, errno.EPERM, errno.EACCES), (
            f"a {mode} block volume took a write (errno {failure})"
        )
    else:
        assert all(m.read_only for m in mounts_at(reader.target)), mounts_at(reader.target)
        assert failure == errno.EROFS, f"a {mode} filesystem took a write (errno {failure})"
    assert read_digest(kind, reader.target) == digest


def test_multi_node_reader_only_volumes_publish_on_two_nodes(
    csi: Csi, kind: Kind, second_node: SecondNode
) -> None:
    mode = "MULTI_NODE_READER_ONLY"
    volume = csi.create_volume(kind, mode=mode)
    csi.controller_publish(volume.volume_id, kind.cap(mode), readonly=True)
    second_node.heartbeat()
    csi.controller_publish(volume.volume_id, kind.cap(mode), node_id=second_node.id, readonly=True)
    got = csi.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id), timeout=60
    )
    assert sorted(got.status.published_node_ids) == sorted([NODE_ID, second_node.id])


# ---- single-node modes -------------------------------------------------------------------


@pytest.mark.parametrize("mode", SINGLE_NODE_MODES)
def test_single_node_modes_refuse_a_second_node(
    csi: Csi, kind: Kind, mode: str, second_node: SecondNode
) -> None:
    volume = csi.create_volume(kind, mode=mode)
    csi.controller_publish(volume.volume_id, kind.cap(mode))
    second_node.heartbeat()
    req = publish_request(volume.volume_id, kind.cap(mode), second_node.id)
    csi.expect(csi.controller.ControllerPublishVolume, req, Code.FAILED_PRECONDITION)
    # and the first node keeps it
    got = csi.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id), timeout=60
    )
    assert list(got.status.published_node_ids) == [NODE_ID]


@pytest.mark.parametrize("mode", ["SINGLE_NODE_WRITER", "SINGLE_NODE_MULTI_WRITER"])
def test_two_pods_on_the_node_share_a_single_node_writer_volume(
    csi: Csi, kind: Kind, mode: str
) -> None:
    volume, pub = csi.provision(kind, mode)
    other = csi.node_publish(volume, pub.cap, pub.publish_context, pub.staging)
    data, digest = payload()
    write_data(kind, pub.target, data)
    assert read_digest(kind, other) == digest
    assert write_error(kind, other) is None


def test_a_single_node_single_writer_volume_is_published_once(csi: Csi, kind: Kind) -> None:
    mode = "SINGLE_NODE_SINGLE_WRITER"
    volume, pub = csi.provision(kind, mode)
    # the same pod again: fine, nothing changes
    csi.node_publish(volume, pub.cap, pub.publish_context, pub.staging, pub.target)
    second = csi.path("target")
    req = csi_pb2.NodePublishVolumeRequest(
        volume_id=volume.volume_id,
        publish_context=pub.publish_context,
        staging_target_path=str(pub.staging),
        target_path=str(second),
        volume_capability=pub.cap,
        volume_context=dict(volume.volume_context),
    )
    csi.expect(csi.node.NodePublishVolume, req, Code.FAILED_PRECONDITION)
    assert not mounts_at(second)
    # once the first pod is gone, another may have it
    csi.unpublish(volume.volume_id, pub.target)
    csi.node_publish(volume, pub.cap, pub.publish_context, pub.staging, second)


# ---- MULTI_NODE_SINGLE_WRITER ------------------------------------------------------------


def test_multi_node_single_writer_has_one_writer_node_and_read_only_readers(
    csi: Csi, second_node: SecondNode
) -> None:
    mode = "MULTI_NODE_SINGLE_WRITER"
    kind = Kind("block")
    volume = csi.create_volume(kind, mode=mode)
    csi.controller_publish(volume.volume_id, kind.cap(mode))
    second_node.heartbeat()
    writer = publish_request(volume.volume_id, kind.cap(mode), second_node.id)
    csi.expect(csi.controller.ControllerPublishVolume, writer, Code.FAILED_PRECONDITION)
    csi.controller_publish(volume.volume_id, kind.cap(mode), node_id=second_node.id, readonly=True)


# ---- the node's volume limit -------------------------------------------------------------


def test_a_node_refuses_more_volumes_than_its_limit(csi: Csi) -> None:
    kind = Kind("block")
    volumes = [csi.create_volume(kind, size=16 * MiB) for _ in range(MAX_VOLUMES_PER_NODE + 1)]
    for volume in volumes[:MAX_VOLUMES_PER_NODE]:
        csi.controller_publish(volume.volume_id, block_cap())
    req = publish_request(volumes[-1].volume_id, block_cap(), NODE_ID)
    csi.expect(csi.controller.ControllerPublishVolume, req, Code.RESOURCE_EXHAUSTED)
    # a freed slot can be used again
    csi.controller_unpublish(volumes[0].volume_id)
    csi.controller_publish(volumes[-1].volume_id, block_cap())
