"""Node service: staging, publishing into pods, stats, growth, and their errors."""

from __future__ import annotations

import os

import grpc
import pytest

from sanity.support import (
    MAX_VOLUMES_PER_NODE,
    NODE_ID,
    TOPOLOGY_KEY,
    Code,
    Csi,
    Kind,
    MiB,
    NodeCap,
    Published,
    assert_code,
    block_cap,
    can_grow_ext4_online,
    capacity,
    csi_pb2,
    loop_devices_backed_by,
    mount_cap,
    mounts,
    mounts_at,
    payload,
    read_digest,
    write_data,
)
from sanity.test_controller import PATH_LIKE_IDS, UNKNOWN_VOLUME

T = 60


def node_caps(csi: Csi) -> set[int]:
    reply = csi.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest(), timeout=T)
    return {c.rpc.type for c in reply.capabilities}


def ok_or_not_found(call: object, request: object) -> None:
    try:
        call(request, timeout=T)  # type: ignore[operator]
    except grpc.RpcError as err:
        assert_code(err, Code.NOT_FOUND)


# ---- NodeGetInfo / NodeGetCapabilities ---------------------------------------------------


def test_node_reports_its_id_volume_limit_and_topology(csi: Csi) -> None:
    answers = [csi.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=T) for _ in range(3)]
    info = answers[0]
    assert info.node_id == NODE_ID
    assert info.max_volumes_per_node == MAX_VOLUMES_PER_NODE
    assert dict(info.accessible_topology.segments).get(TOPOLOGY_KEY) == NODE_ID
    assert answers[0] == answers[1] == answers[2]


def test_node_offers_staging_stats_and_expansion(csi: Csi) -> None:
    caps = node_caps(csi)
    wanted = {
        NodeCap.STAGE_UNSTAGE_VOLUME: "NodeStage/NodeUnstage",
        NodeCap.GET_VOLUME_STATS: "NodeGetVolumeStats",
        NodeCap.EXPAND_VOLUME: "NodeExpandVolume",
        NodeCap.SINGLE_NODE_MULTI_WRITER: "SINGLE_NODE_SINGLE/MULTI_WRITER modes",
    }
    missing = [what for cap, what in wanted.items() if cap not in caps]
    assert not missing, f"NodeGetCapabilities lacks: {missing}"


# ---- NodeStageVolume / NodeUnstageVolume -------------------------------------------------


def stage_request(csi: Csi, **fields: object) -> csi_pb2.NodeStageVolumeRequest:
    defaults: dict[str, object] = {
        "volume_id": UNKNOWN_VOLUME,
        "staging_target_path": str(csi.staging_dir()),
        "volume_capability": mount_cap(),
    }
    defaults.update(fields)
    return csi_pb2.NodeStageVolumeRequest(**defaults)


@pytest.mark.parametrize("missing", ["volume_id", "staging_target_path", "volume_capability"])
def test_staging_without_a_required_field_is_refused(csi: Csi, missing: str) -> None:
    volume = csi.create_volume()
    ctx = csi.controller_publish(volume.volume_id, mount_cap())
    req = stage_request(csi, volume_id=volume.volume_id, publish_context=ctx)
    req.ClearField(missing)
    csi.expect(csi.node.NodeStageVolume, req, Code.INVALID_ARGUMENT, missing)


@pytest.mark.parametrize("volume_id", [UNKNOWN_VOLUME, *PATH_LIKE_IDS])
def test_staging_an_unknown_volume_is_not_found(csi: Csi, volume_id: str) -> None:
    req = stage_request(csi, volume_id=volume_id)
    csi.expect(csi.node.NodeStageVolume, req, Code.NOT_FOUND)
    assert not mounts_at(req.staging_target_path)


def test_staging_at_the_same_path_with_another_access_type_is_already_exists(csi: Csi) -> None:
    volume = csi.create_volume(Kind("ext4"))
    ctx = csi.controller_publish(volume.volume_id, mount_cap())
    staging = csi.stage(volume, mount_cap(), ctx)
    req = stage_request(
        csi,
        volume_id=volume.volume_id,
        staging_target_path=str(staging),
        volume_capability=block_cap(),
        publish_context=ctx,
    )
    csi.expect(csi.node.NodeStageVolume, req, Code.ALREADY_EXISTS)


@pytest.mark.parametrize("missing", ["volume_id", "staging_target_path"])
def test_unstaging_without_a_required_field_is_refused(csi: Csi, missing: str) -> None:
    req = csi_pb2.NodeUnstageVolumeRequest(
        volume_id=UNKNOWN_VOLUME, staging_target_path=str(csi.staging_dir())
    )
    req.ClearField(missing)
    csi.expect(csi.node.NodeUnstageVolume, req, Code.INVALID_ARGUMENT, missing)


def test_unstaging_a_volume_that_is_not_staged_succeeds(csi: Csi) -> None:
    volume = csi.create_volume()
    staging = csi.staging_dir()
    for _ in range(3):
        csi.unstage(volume.volume_id, staging)


@pytest.mark.parametrize("volume_id", PATH_LIKE_IDS)
def test_unstaging_a_path_like_volume_id_touches_nothing(csi: Csi, volume_id: str) -> None:
    staging = csi.staging_dir()
    req = csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging))
    ok_or_not_found(csi.node.NodeUnstageVolume, req)


# ---- NodePublishVolume / NodeUnpublishVolume ---------------------------------------------


def publish_request(csi: Csi, pub: Published | None = None, **fields: object
                    ) -> csi_pb2.NodePublishVolumeRequest:  # fmt: skip
    defaults: dict[str, object] = {
        "volume_id": pub.volume_id if pub else UNKNOWN_VOLUME,
        "staging_target_path": str(pub.staging if pub else csi.staging_dir()),
        "target_path": str(csi.path("target")),
        "volume_capability": pub.cap if pub else mount_cap(),
        "publish_context": pub.publish_context if pub else {},
    }
    defaults.update(fields)
    return csi_pb2.NodePublishVolumeRequest(**defaults)


@pytest.mark.parametrize("missing", ["volume_id", "target_path", "volume_capability"])
def test_publishing_without_a_required_field_is_refused(csi: Csi, missing: str) -> None:
    _, pub = csi.provision(Kind("ext4"))
    req = publish_request(csi, pub)
    req.ClearField(missing)
    csi.expect(csi.node.NodePublishVolume, req, Code.INVALID_ARGUMENT, missing)


def test_publishing_without_a_staging_path_is_failed_precondition(csi: Csi) -> None:
    # spec: STAGE_UNSTAGE_VOLUME is offered, so a missing staging_target_path
    # is FAILED_PRECONDITION ("Staging target path not set")
    _, pub = csi.provision(Kind("ext4"))
    req = publish_request(csi, pub)
    req.ClearField("staging_target_path")
    csi.expect(csi.node.NodePublishVolume, req, Code.FAILED_PRECONDITION, "staging_target_path")
    assert not mounts_at(req.target_path)


@pytest.mark.parametrize("volume_id", [UNKNOWN_VOLUME, *PATH_LIKE_IDS])
def test_publishing_an_unknown_volume_is_not_found(csi: Csi, volume_id: str) -> None:
    req = publish_request(csi, volume_id=volume_id)
    csi.expect(csi.node.NodePublishVolume, req, Code.NOT_FOUND)
    assert not os.path.lexists(req.target_path), "a refused publish must not create the target"


@pytest.mark.parametrize("missing", ["volume_id", "target_path"])
def test_unpublishing_without_a_required_field_is_refused(csi: Csi, missing: str) -> None:
    req = csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=UNKNOWN_VOLUME, target_path=str(csi.path("target"))
    )
    req.ClearField(missing)
    csi.expect(csi.node.NodeUnpublishVolume, req, Code.INVALID_ARGUMENT, missing)


def test_unpublishing_a_target_that_does_not_exist_succeeds(csi: Csi) -> None:
    volume = csi.create_volume()
    target = csi.path("target")
    for _ in range(3):
        csi.unpublish(volume.volume_id, target)


@pytest.mark.parametrize("volume_id", PATH_LIKE_IDS)
def test_unpublishing_a_path_like_volume_id_touches_nothing(csi: Csi, volume_id: str) -> None:
    target = csi.path("target")
    target.mkdir()
    (target / "keep").write_text("mine")
    req = csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))
    ok_or_not_found(csi.node.NodeUnpublishVolume, req)


def test_unpublishing_removes_the_target(csi: Csi, kind: Kind) -> None:
    _, pub = csi.provision(kind)
    assert os.path.lexists(pub.target)
    csi.unpublish(pub.volume_id, pub.target)
    assert not mounts_at(pub.target)
    assert not os.path.lexists(pub.target), "the SP MUST delete what it created at target_path"


# ---- NodeGetVolumeStats ------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["volume_id", "volume_path"])
def test_stats_without_a_required_field_are_refused(csi: Csi, missing: str) -> None:
    _, pub = csi.provision(Kind("ext4"))
    req = csi_pb2.NodeGetVolumeStatsRequest(volume_id=pub.volume_id, volume_path=str(pub.target))
    req.ClearField(missing)
    csi.expect(csi.node.NodeGetVolumeStats, req, Code.INVALID_ARGUMENT, missing)


@pytest.mark.parametrize("volume_id", [UNKNOWN_VOLUME, *PATH_LIKE_IDS])
def test_stats_of_an_unknown_volume_are_not_found(csi: Csi, volume_id: str) -> None:
    req = csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=str(csi.workdir))
    csi.expect(csi.node.NodeGetVolumeStats, req, Code.NOT_FOUND)


def test_stats_of_a_path_where_the_volume_is_not_are_not_found(csi: Csi) -> None:
    _, pub = csi.provision(Kind("ext4"))
    req = csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=pub.volume_id, volume_path=str(csi.path("nowhere"))
    )
    csi.expect(csi.node.NodeGetVolumeStats, req, Code.NOT_FOUND)


def usage(csi: Csi, pub: Published) -> dict[int, csi_pb2.VolumeUsage]:
    reply = csi.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=pub.volume_id, volume_path=str(pub.target)),
        timeout=T,
    )
    if NodeCap.VOLUME_CONDITION in node_caps(csi):
        assert not reply.volume_condition.abnormal, reply.volume_condition.message
    return {u.unit: u for u in reply.usage}


def test_stats_show_the_space_a_pod_uses(csi: Csi, fs_kind: Kind) -> None:
    volume, pub = csi.provision(fs_kind)
    Unit = csi_pb2.VolumeUsage.Unit
    before = usage(csi, pub)
    assert Unit.BYTES in before, before
    if fs_kind.is_block:
        assert before[Unit.BYTES].total == volume.capacity_bytes
        return
    assert Unit.INODES in before, "a filesystem volume should report inodes too"
    b = before[Unit.BYTES]
    assert 0 < b.total <= volume.capacity_bytes
    assert b.available > 0 and b.used >= 0
    data, _ = payload(16 * 1024 * 1024)
    write_data(fs_kind, pub.target, data)
    after = usage(csi, pub)[Unit.BYTES]
    assert after.used >= b.used + len(data) // 2, (b, after)
    assert after.available < b.available


# ---- NodeExpandVolume --------------------------------------------------------------------


def node_expand_request(pub: Published | None = None, **fields: object
                        ) -> csi_pb2.NodeExpandVolumeRequest:  # fmt: skip
    defaults: dict[str, object] = {
        "volume_id": pub.volume_id if pub else UNKNOWN_VOLUME,
        "volume_path": str(pub.target) if pub else "/nonexistent",
        "capacity_range": capacity(pub.volume.capacity_bytes if pub else 1 << 30),
    }
    if pub:
        defaults["staging_target_path"] = str(pub.staging)
        defaults["volume_capability"] = pub.cap
    defaults.update(fields)
    return csi_pb2.NodeExpandVolumeRequest(**defaults)


@pytest.mark.parametrize("missing", ["volume_id", "volume_path"])
def test_node_expansion_without_a_required_field_is_refused(csi: Csi, missing: str) -> None:
    _, pub = csi.provision(Kind("ext4"))
    req = node_expand_request(pub)
    req.ClearField(missing)
    csi.expect(csi.node.NodeExpandVolume, req, Code.INVALID_ARGUMENT, missing)


@pytest.mark.parametrize("volume_id", [UNKNOWN_VOLUME, *PATH_LIKE_IDS])
def test_node_expansion_of_an_unknown_volume_is_not_found(csi: Csi, volume_id: str) -> None:
    req = node_expand_request(volume_id=volume_id, volume_path=str(csi.workdir))
    csi.expect(csi.node.NodeExpandVolume, req, Code.NOT_FOUND)


def test_node_expansion_where_the_volume_is_not_published_is_not_found(csi: Csi) -> None:
    _, pub = csi.provision(Kind("ext4"))
    req = node_expand_request(pub, volume_path=str(csi.path("nowhere")))
    csi.expect(csi.node.NodeExpandVolume, req, Code.NOT_FOUND)


# ---- a missing field is INVALID_ARGUMENT whatever the ID says ------------------------------

#: a volume ID that is not ours, one that is ours in form but was never issued, one path-like
MADE_UP_IDS = ["pvc-made-up-by-the-test", UNKNOWN_VOLUME, "../../etc"]


def _node_requests(csi: Csi, volume_id: str) -> dict[str, object]:
    cap = mount_cap()
    staging, target = str(csi.staging_dir()), str(csi.path("target"))
    return {
        "NodeStageVolume": csi_pb2.NodeStageVolumeRequest(
            volume_id=volume_id, staging_target_path=staging, volume_capability=cap
        ),
        "NodeUnstageVolume": csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume_id, staging_target_path=staging
        ),
        "NodePublishVolume": csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id, staging_target_path=staging, target_path=target,
            volume_capability=cap,
        ),
        "NodeUnpublishVolume": csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume_id, target_path=target
        ),
        "NodeGetVolumeStats": csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=volume_id, volume_path=str(csi.workdir)
        ),
        "NodeExpandVolume": csi_pb2.NodeExpandVolumeRequest(
            volume_id=volume_id, volume_path=str(csi.workdir)
        ),
    }  # fmt: skip


NODE_MISSING = [
    ("NodeStageVolume", "staging_target_path"),
    ("NodeStageVolume", "volume_capability"),
    ("NodeUnstageVolume", "staging_target_path"),
    ("NodePublishVolume", "target_path"),
    ("NodePublishVolume", "volume_capability"),
    ("NodeUnpublishVolume", "target_path"),
    ("NodeGetVolumeStats", "volume_path"),
    ("NodeExpandVolume", "volume_path"),
]


@pytest.mark.parametrize("volume_id", MADE_UP_IDS)
@pytest.mark.parametrize(
    ("rpc", "missing"), NODE_MISSING, ids=[f"{r}-{m}" for r, m in NODE_MISSING]
)
def test_a_missing_field_is_invalid_argument_even_with_a_made_up_volume_id(
    csi: Csi, rpc: str, missing: str, volume_id: str
) -> None:
    req = _node_requests(csi, volume_id)[rpc]
    req.ClearField(missing)  # type: ignore[attr-defined]
    csi.expect(getattr(csi.node, rpc), req, Code.INVALID_ARGUMENT, missing)


@pytest.mark.parametrize("rpc", ["NodeStageVolume", "NodePublishVolume"])
def test_a_capability_without_access_mode_is_invalid_argument_even_with_a_made_up_volume_id(
    csi: Csi, rpc: str
) -> None:
    req = _node_requests(csi, MADE_UP_IDS[0])[rpc]
    req.volume_capability.ClearField("access_mode")  # type: ignore[attr-defined]
    csi.expect(getattr(csi.node, rpc), req, Code.INVALID_ARGUMENT, "access_mode")


def test_a_complete_request_with_a_made_up_volume_id_is_not_found(csi: Csi) -> None:
    for rpc, req in _node_requests(csi, MADE_UP_IDS[0]).items():
        err = csi.error(getattr(csi.node, rpc), req)
        assert_code(err, Code.NOT_FOUND)
    assert not [m for m in mounts() if m.mount_point.startswith(str(csi.workdir))]


@pytest.mark.parametrize("path", ["some/path", "/nonexistent-tessera-sanity/volume"])
def test_stats_of_a_relative_or_missing_path_are_not_found(csi: Csi, kind: Kind, path: str) -> None:
    _, pub = csi.provision(kind)
    req = csi_pb2.NodeGetVolumeStatsRequest(volume_id=pub.volume_id, volume_path=path)
    csi.expect(csi.node.NodeGetVolumeStats, req, Code.NOT_FOUND, "volume_path")


def test_stats_with_an_empty_path_are_invalid_argument(csi: Csi) -> None:
    req = csi_pb2.NodeGetVolumeStatsRequest(volume_id=MADE_UP_IDS[0], volume_path="")
    csi.expect(csi.node.NodeGetVolumeStats, req, Code.INVALID_ARGUMENT, "volume_path")


@pytest.mark.parametrize(
    "path", ["relative/target", "/tmp/../etc/x", "/tmp/a\nb"], ids=["relative", "dotdot", "newline"]
)
def test_a_malformed_target_path_is_invalid_argument_and_touches_nothing(
    csi: Csi, path: str
) -> None:
    req = csi_pb2.NodeUnpublishVolumeRequest(volume_id=UNKNOWN_VOLUME, target_path=path)
    csi.expect(csi.node.NodeUnpublishVolume, req, Code.INVALID_ARGUMENT, "target_path")


# ---- regressions found by the CSI fuzzer (tests/fuzz/test_csi_fuzz.py) ----------------------


def test_a_refused_stage_leaves_the_volume_detached(csi: Csi) -> None:
    # fuzz example: an ext4 volume staged as xfs answered FAILED_PRECONDITION and stayed
    # attached on a loop device; kubelet never unstages after a final error
    volume = csi.create_volume(Kind("ext4"))
    ctx = csi.controller_publish(volume.volume_id, mount_cap())
    staging = csi.stage(volume, mount_cap(), ctx)  # formats it ext4
    csi.unstage(volume.volume_id, staging)
    cap = mount_cap("xfs", "SINGLE_NODE_MULTI_WRITER")
    req = csi_pb2.NodeStageVolumeRequest(
        volume_id=volume.volume_id,
        staging_target_path=str(csi.path("2m")),
        volume_capability=cap,
        publish_context={"À\x93\U00078fd4i\x13\x185\x02": "", "": "", "Æ\x17\x18\x13mÐ4": "false"},
    )
    csi.expect(csi.node.NodeStageVolume, req, Code.FAILED_PRECONDITION, "xfs")
    backing = f"{volume.volume_id}.img"
    left = [d for d, f in loop_devices_backed_by(csi.stack.state_dir) if f.endswith(backing)]
    assert not left, f"the refused stage left {volume.volume_id} attached on {left}"


@pytest.mark.parametrize(
    ("mode", "same_target", "code"),
    [
        ("SINGLE_NODE_SINGLE_WRITER", False, Code.FAILED_PRECONDITION),
        ("MULTI_NODE_MULTI_WRITER", True, Code.ALREADY_EXISTS),
    ],
    ids=["single-writer-elsewhere", "onto-the-pods-mount"],
)
def test_a_refused_read_only_block_publish_leaves_no_extra_device(
    csi: Csi, mode: str, same_target: bool, code: Code
) -> None:
    # fuzz examples: a read-only block publish of a volume a pod has mounted made a
    # read-only view (a second loop device) and kept it after answering an error
    _, pub = csi.provision(Kind("ext4"))
    backing = f"{pub.volume_id}.img"

    def loops() -> list[str]:
        return [d for d, f in loop_devices_backed_by(csi.stack.state_dir) if f.endswith(backing)]

    before = loops()
    req = publish_request(
        csi,
        pub,
        target_path=str(pub.target if same_target else csi.path("kid")),
        volume_capability=block_cap(mode),
        readonly=True,
        volume_context={"fsType": "xfs"},
    )
    csi.expect(csi.node.NodePublishVolume, req, code)
    assert loops() == before


def test_publishing_at_the_staging_path_is_refused_and_keeps_the_volume_staged(
    csi: Csi,
) -> None:
    # fuzz example: target_path == staging_target_path answered OK, and the
    # NodeUnpublish of that target unmounted the staged volume
    _, pub = csi.provision(Kind("ext4"))
    req = publish_request(csi, pub, target_path=str(pub.staging))
    csi.expect(csi.node.NodePublishVolume, req, Code.INVALID_ARGUMENT, "target_path")
    assert mounts_at(pub.staging), "the volume must still be staged"


@pytest.mark.parametrize(
    "cap", [block_cap("MULTI_NODE_MULTI_WRITER"), mount_cap()], ids=["block", "mount"]
)
def test_publishing_onto_the_staging_mount_under_another_staging_path_keeps_it_staged(
    csi: Csi, cap: csi_pb2.VolumeCapability
) -> None:
    # fuzz example: target_path = the volume's staging mount, staging_target_path = some
    # other directory: answered OK ("published already"), and unpublishing unstaged it
    _, pub = csi.provision(Kind("ext4"))
    req = publish_request(
        csi,
        pub,
        staging_target_path=str(csi.staging_dir()),
        target_path=str(pub.staging),
        volume_capability=cap,
        publish_context={"transport": "nbd"} if cap.HasField("block") else pub.publish_context,
    )
    csi.expect(csi.node.NodePublishVolume, req, (Code.ALREADY_EXISTS, Code.FAILED_PRECONDITION))
    assert mounts_at(pub.staging), "the volume must still be staged"


def test_growing_ext4_without_the_needed_privilege_says_how_to_fix_the_deployment(
    csi: Csi,
) -> None:
    # fuzz example (seed 7): NodeExpandVolume of a grown ext4 volume, volume_path its
    # publish, nothing else: INTERNAL where CAP_SYS_RESOURCE is missing
    if can_grow_ext4_online():
        pytest.skip("this process may grow ext4 online: nothing to refuse here")
    _, pub = csi.provision(Kind("ext4"))
    csi.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=pub.volume_id, capacity_range=capacity(2 * pub.volume.capacity_bytes)
        ),
        timeout=T,
    )
    req = csi_pb2.NodeExpandVolumeRequest(volume_id=pub.volume_id, volume_path=str(pub.target))
    csi.expect(csi.node.NodeExpandVolume, req, Code.FAILED_PRECONDITION, "CAP_SYS_RESOURCE")


# ---- regressions found in review -------------------------------------------------------------


@pytest.mark.parametrize("a_here", [True, False], ids=["a-staged-here", "a-not-attached"])
def test_unpublishing_another_volumes_target_is_refused_and_the_pod_keeps_its_volume(
    csi: Csi, kind: Kind, a_here: bool
) -> None:
    # reproduced: with B published, NodeUnpublish(A, B's target) answered OK and
    # unmounted and removed B's target under B's pod
    a = csi.provision(kind)[0] if a_here else csi.create_volume(kind)
    _, b = csi.provision(kind)
    data, digest = payload(MiB)
    write_data(kind, b.target, data)
    req = csi_pb2.NodeUnpublishVolumeRequest(volume_id=a.volume_id, target_path=str(b.target))
    for _ in range(2):
        csi.expect(
            csi.node.NodeUnpublishVolume, req, Code.FAILED_PRECONDITION, "target_path", a.volume_id
        )
    assert mounts_at(b.target), "another volume's NodeUnpublish unmounted B's target"
    assert read_digest(kind, b.target, MiB) == digest


@pytest.mark.parametrize("a_here", [True, False], ids=["a-staged-here", "a-not-attached"])
def test_unstaging_another_volumes_staging_path_is_refused_and_it_stays_staged(
    csi: Csi, mount_kind: Kind, a_here: bool
) -> None:
    # reproduced: NodeUnstage(A, B's staging path) unmounted B's staging mount, with A
    # attached here (staged as a block volume: nothing of its own mounted anywhere)
    # or not attached on this node at all
    a = csi.create_volume(Kind("block"))
    if a_here:
        csi.stage(a, block_cap(), csi.controller_publish(a.volume_id, block_cap()))
    _, b = csi.provision(mount_kind)
    req = csi_pb2.NodeUnstageVolumeRequest(
        volume_id=a.volume_id, staging_target_path=str(b.staging)
    )
    csi.expect(
        csi.node.NodeUnstageVolume, req, Code.FAILED_PRECONDITION, "staging_target_path", "ext4"
    )
    assert mounts_at(b.staging), "another volume's NodeUnstage unmounted B's staging mount"
    assert len(mounts_at(b.target)) == 1
    csi.unpublish_all(b)  # B itself still unpublishes and unstages cleanly
