"""NodeGetVolumeStats and NodeExpandVolume answer for this volume's mount, or NOT_FOUND.

Stats of a path that is not (or no longer) the volume's mount used to
report whatever filesystem held that path: the host's root filesystem,
hundreds of GB, shown to a user as their 128 MiB volume. The error codes
of NodeExpandVolume follow the spec's table as kubelet reads it:
FAILED_PRECONDITION is final there (kubelet stops retrying and marks the
resize infeasible), so it is kept for "cannot grow while in use"; a
condition that can clear stays retryable.
"""

from __future__ import annotations

from pathlib import Path

from sanity.support import (
    Code,
    Csi,
    Kind,
    MiB,
    Published,
    block_cap,
    capacity,
    csi_pb2,
    mount_cap,
    unique_name,
)
from tessera.system import syscalls

T = 180


def stats_request(pub: Published, path: Path | str) -> csi_pb2.NodeGetVolumeStatsRequest:
    return csi_pb2.NodeGetVolumeStatsRequest(volume_id=pub.volume_id, volume_path=str(path))


def expand_request(pub: Published, path: Path | str | None = None,
                   **fields: object) -> csi_pb2.NodeExpandVolumeRequest:  # fmt: skip
    defaults: dict[str, object] = {
        "volume_id": pub.volume_id,
        "volume_path": str(path or pub.target),
        "staging_target_path": str(pub.staging),
        "capacity_range": capacity(pub.volume.capacity_bytes),
        "volume_capability": pub.cap,
    }
    defaults.update(fields)
    return csi_pb2.NodeExpandVolumeRequest(**defaults)


def unmount_behind_the_plugins_back(path: Path) -> None:
    """What a reboot, an admin or a crashed kubelet leaves: the mount gone, the path still there."""
    syscalls.umount(str(path))


# ---- NodeGetVolumeStats -------------------------------------------------------------------


def test_stats_of_a_plain_directory_are_not_found_never_the_host_disk(csi: Csi, kind: Kind) -> None:
    _, pub = csi.provision(kind)
    plain = csi.path("plain")
    plain.mkdir()
    csi.expect(csi.node.NodeGetVolumeStats, stats_request(pub, plain), Code.NOT_FOUND,
               "volume_path", str(plain))  # fmt: skip


def test_stats_of_another_volumes_mount_are_not_found(csi: Csi, kind: Kind) -> None:
    _, mine = csi.provision(kind)
    _, theirs = csi.provision(kind)
    for path in (theirs.target, theirs.staging) if not kind.is_block else (theirs.target,):
        csi.expect(csi.node.NodeGetVolumeStats, stats_request(mine, path), Code.NOT_FOUND,
                   "volume_path")  # fmt: skip


def test_stats_of_a_file_that_is_no_bind_of_the_device_are_not_found(csi: Csi) -> None:
    _, pub = csi.provision(Kind("block"))
    lookalike = csi.path("lookalike")
    lookalike.write_bytes(b"")
    csi.expect(csi.node.NodeGetVolumeStats, stats_request(pub, lookalike), Code.NOT_FOUND,
               "volume_path")  # fmt: skip


def test_stats_at_the_staging_mount_describe_the_volume(csi: Csi) -> None:
    volume, pub = csi.provision(Kind("ext4"))
    reply = csi.node.NodeGetVolumeStats(stats_request(pub, pub.staging), timeout=T)
    total = {u.unit: u.total for u in reply.usage}[csi_pb2.VolumeUsage.BYTES]
    assert 0 < total <= volume.capacity_bytes
    assert not reply.volume_condition.abnormal, reply.volume_condition.message


def test_stats_after_the_mount_is_gone_are_not_found(csi: Csi, kind: Kind) -> None:
    _, pub = csi.provision(kind)
    unmount_behind_the_plugins_back(pub.target)
    csi.expect(csi.node.NodeGetVolumeStats, stats_request(pub, pub.target), Code.NOT_FOUND,
               "volume_path")  # fmt: skip


def test_stats_after_unstaging_are_not_found(csi: Csi) -> None:
    _, pub = csi.provision(Kind("ext4"))
    csi.unpublish(pub.volume_id, pub.target)
    csi.unstage(pub.volume_id, pub.staging)
    csi.expect(csi.node.NodeGetVolumeStats, stats_request(pub, pub.staging), Code.NOT_FOUND,
               "volume_path")  # fmt: skip


# ---- NodeExpandVolume ---------------------------------------------------------------------


def test_expanding_at_a_plain_directory_is_not_found(csi: Csi, kind: Kind) -> None:
    _, pub = csi.provision(kind)
    plain = csi.path("plain")
    plain.mkdir()
    csi.expect(csi.node.NodeExpandVolume, expand_request(pub, plain), Code.NOT_FOUND,
               "volume_path")  # fmt: skip


def test_expanding_after_the_mount_is_gone_is_not_found_not_final(csi: Csi) -> None:
    # FAILED_PRECONDITION here would make kubelet give up on the resize for good
    _, pub = csi.provision(Kind("ext4"))
    unmount_behind_the_plugins_back(pub.target)
    csi.expect(csi.node.NodeExpandVolume, expand_request(pub), Code.NOT_FOUND, "volume_path")


def test_expanding_with_a_capability_that_contradicts_the_volume_is_invalid(
    csi: Csi, kind: Kind
) -> None:
    _, pub = csi.provision(kind)
    wrong = mount_cap() if kind.is_block else block_cap()
    req = expand_request(pub, volume_capability=wrong)
    csi.expect(csi.node.NodeExpandVolume, req, Code.INVALID_ARGUMENT, "volume_capability")


def test_expanding_to_a_limit_below_the_volume_is_out_of_range(csi: Csi, kind: Kind) -> None:
    _, pub = csi.provision(kind)
    small = pub.volume.capacity_bytes // 2
    req = expand_request(pub, capacity_range=capacity(small, small))
    csi.expect(csi.node.NodeExpandVolume, req, Code.OUT_OF_RANGE, "limit_bytes")


def test_expanding_past_what_the_controller_grew_stays_retryable(csi: Csi, kind: Kind) -> None:
    _, pub = csi.provision(kind)
    req = expand_request(pub, capacity_range=capacity(pub.volume.capacity_bytes + 64 * MiB))
    err = csi.error(csi.node.NodeExpandVolume, req)
    assert err.code() not in (Code.FAILED_PRECONDITION, Code.OK), err
    assert err.code() == Code.ABORTED, err.details()


def test_expanding_a_volume_attached_read_only_is_final(csi: Csi) -> None:
    # formatted first (a blank volume cannot be staged read-only), then used read-only
    mode = "SINGLE_NODE_READER_ONLY"
    caps = [mount_cap(), mount_cap(mode=mode)]
    volume = csi.create_volume(Kind("ext4"), name=unique_name("ro-expand"), caps=caps)
    first = csi.publish_all(volume, Kind("ext4"))
    csi.unpublish_all(first)
    pub = csi.publish_all(volume, Kind("ext4"), mode, readonly=True)
    csi.expect(csi.node.NodeExpandVolume, expand_request(pub), Code.FAILED_PRECONDITION,
               "read-only")  # fmt: skip


def test_expanding_at_a_read_only_publish_grows_through_the_staging_mount(csi: Csi) -> None:
    volume, pub = csi.provision(Kind("ext4"))
    ro_target = csi.node_publish(volume, pub.cap, pub.publish_context, pub.staging,
                                 readonly=True)  # fmt: skip
    reply = csi.node.NodeExpandVolume(expand_request(pub, ro_target), timeout=T)
    assert reply.capacity_bytes == volume.capacity_bytes


def test_expanding_twice_answers_the_same(csi: Csi, kind: Kind) -> None:
    _, pub = csi.provision(kind)
    answers = [csi.node.NodeExpandVolume(expand_request(pub), timeout=T) for _ in range(2)]
    assert answers[0].capacity_bytes == answers[1].capacity_bytes == pub.volume.capacity_bytes
