"""Snapshots, restores and clones through the Controller service, as the external-snapshotter
and external-provisioner drive them (CSI v1.12), with data checked through real
NodeStage/NodePublish.

The argument-error cases also mirror upstream csi-sanity's snapshot tests
(pkg/sanity/controller.go), which run as soon as CREATE_DELETE_SNAPSHOT is
advertised: made-up IDs, maximum-length names, filters that name nothing.
"""

from __future__ import annotations

import os

import pytest

from sanity.support import (
    RPC_TIMEOUT,
    Code,
    ControllerCap,
    Csi,
    Kind,
    MiB,
    capacity,
    csi_pb2,
    payload,
    read_digest,
    unique_name,
    write_data,
)

#: well-formed, never issued
UNKNOWN_SNAPSHOT = "snap-" + "0" * 32
UNKNOWN_VOLUME = "vol-" + "0" * 32
#: what csi-sanity sends: IDs of no shape of ours
FOREIGN_IDS = ["none-exist-id", "non-existing-snapshot-id", "../../etc/passwd"]

SnapshotSource = csi_pb2.VolumeContentSource.SnapshotSource
VolumeSource = csi_pb2.VolumeContentSource.VolumeSource


# ---- helpers (also used by test_group_snapshots and test_snapshot_metadata) -------------------


def create_snapshot(
    csi: Csi, source_volume_id: str, name: str = "", **kw: object
) -> csi_pb2.Snapshot:
    req = csi_pb2.CreateSnapshotRequest(
        source_volume_id=source_volume_id,
        name=name or unique_name("snap"),
        **kw,  # type: ignore[arg-type]
    )
    snap = csi.controller.CreateSnapshot(req, timeout=RPC_TIMEOUT).snapshot
    remember_snapshot(csi, snap.snapshot_id)
    return snap


def remember_snapshot(csi: Csi, snapshot_id: str) -> None:
    def undo() -> None:
        req = csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id)
        csi.controller.DeleteSnapshot(req, timeout=RPC_TIMEOUT)

    csi.remember(("snapshot", snapshot_id), undo)


def delete_snapshot(csi: Csi, snapshot_id: str) -> None:
    req = csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id)
    csi.controller.DeleteSnapshot(req, timeout=RPC_TIMEOUT)
    csi.forget(("snapshot", snapshot_id))


def content_source(snapshot_id: str = "", volume_id: str = "") -> csi_pb2.VolumeContentSource:
    if snapshot_id:
        return csi_pb2.VolumeContentSource(snapshot=SnapshotSource(snapshot_id=snapshot_id))
    return csi_pb2.VolumeContentSource(volume=VolumeSource(volume_id=volume_id))


def restore_request(
    kind: Kind, *, snapshot_id: str = "", volume_id: str = "", size: int = 0, limit: int = 0
) -> csi_pb2.CreateVolumeRequest:
    return csi_pb2.CreateVolumeRequest(
        name=unique_name("restore"),
        capacity_range=capacity(size or kind.size, limit),
        volume_capabilities=[kind.cap()],
        volume_content_source=content_source(snapshot_id, volume_id),
    )


def list_all(csi: Csi, **kw: object) -> list[csi_pb2.Snapshot]:
    reply = csi.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(**kw), timeout=RPC_TIMEOUT)  # type: ignore[arg-type]
    return [e.snapshot for e in reply.entries]


# ---- capabilities --------------------------------------------------------------------------


def test_controller_advertises_snapshots_and_clones(csi: Csi) -> None:
    reply = csi.controller.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest())
    have = {c.rpc.type for c in reply.capabilities}
    wanted = {
        ControllerCap.CREATE_DELETE_SNAPSHOT,
        ControllerCap.LIST_SNAPSHOTS,
        ControllerCap.GET_SNAPSHOT,
        ControllerCap.CLONE_VOLUME,
    }
    assert wanted <= have


# ---- argument errors: required fields first, then made-up IDs ---------------------------------


@pytest.mark.parametrize(
    ("request_kw", "code", "mention"),
    [
        ({}, Code.INVALID_ARGUMENT, "name"),
        ({"name": "s"}, Code.INVALID_ARGUMENT, "source_volume_id"),
        ({"source_volume_id": UNKNOWN_VOLUME}, Code.INVALID_ARGUMENT, "name"),
        # a missing name wins over a made-up source: presence is checked first
        ({"source_volume_id": "made-up"}, Code.INVALID_ARGUMENT, "name"),
        ({"name": "s", "source_volume_id": UNKNOWN_VOLUME}, Code.NOT_FOUND, UNKNOWN_VOLUME),
        ({"name": "s", "source_volume_id": "made-up"}, Code.NOT_FOUND, "source_volume_id"),
        ({"name": "s\x01", "source_volume_id": UNKNOWN_VOLUME}, Code.INVALID_ARGUMENT, "name"),
        ({"name": "x" * 129, "source_volume_id": UNKNOWN_VOLUME}, Code.INVALID_ARGUMENT, "name"),
    ],
)
def test_create_snapshot_refuses_bad_requests_naming_the_field(
    csi: Csi, request_kw: dict[str, str], code: Code, mention: str
) -> None:
    csi.expect(
        csi.controller.CreateSnapshot, csi_pb2.CreateSnapshotRequest(**request_kw), code, mention
    )


def test_create_snapshot_refuses_an_unknown_parameter_by_name(csi: Csi) -> None:
    volume = csi.create_volume(Kind("block"))
    req = csi_pb2.CreateSnapshotRequest(
        name=unique_name("snap"), source_volume_id=volume.volume_id, parameters={"retain": "7d"}
    )
    csi.expect(csi.controller.CreateSnapshot, req, Code.INVALID_ARGUMENT, "retain")


def test_delete_snapshot_needs_an_id_and_a_made_up_one_is_already_gone(csi: Csi) -> None:
    csi.expect(
        csi.controller.DeleteSnapshot,
        csi_pb2.DeleteSnapshotRequest(),
        Code.INVALID_ARGUMENT,
        "snapshot_id",
    )
    for sid in [UNKNOWN_SNAPSHOT, *FOREIGN_IDS]:
        csi.controller.DeleteSnapshot(
            csi_pb2.DeleteSnapshotRequest(snapshot_id=sid), timeout=RPC_TIMEOUT
        )


def test_get_snapshot_needs_an_id_and_a_made_up_one_is_not_found(csi: Csi) -> None:
    csi.expect(
        csi.controller.GetSnapshot,
        csi_pb2.GetSnapshotRequest(),
        Code.INVALID_ARGUMENT,
        "snapshot_id",
    )
    for sid in [UNKNOWN_SNAPSHOT, *FOREIGN_IDS]:
        csi.expect(
            csi.controller.GetSnapshot,
            csi_pb2.GetSnapshotRequest(snapshot_id=sid),
            Code.NOT_FOUND,
            "snapshot",
        )


@pytest.mark.parametrize(
    "filters",
    [
        {"snapshot_id": UNKNOWN_SNAPSHOT},
        {"snapshot_id": "none-exist-id"},
        {"source_volume_id": UNKNOWN_VOLUME},
        {"source_volume_id": "none-exist-volume-id"},
    ],
)
def test_list_snapshots_with_a_filter_naming_nothing_is_an_empty_list(
    csi: Csi, filters: dict[str, str]
) -> None:
    assert list_all(csi, **filters) == []


def test_list_snapshots_refuses_a_bad_token_and_a_negative_limit(csi: Csi) -> None:
    csi.expect(
        csi.controller.ListSnapshots,
        csi_pb2.ListSnapshotsRequest(starting_token="not-a-token"),
        Code.ABORTED,
        "starting_token",
    )
    csi.expect(
        csi.controller.ListSnapshots,
        csi_pb2.ListSnapshotsRequest(max_entries=-1),
        Code.INVALID_ARGUMENT,
        "max_entries",
    )


@pytest.mark.parametrize(
    ("source", "mention"),
    [
        (content_source(snapshot_id=UNKNOWN_SNAPSHOT), UNKNOWN_SNAPSHOT),
        (content_source(snapshot_id="non-existing-snapshot-id"), "snapshot"),
        (content_source(volume_id=UNKNOWN_VOLUME), UNKNOWN_VOLUME),
        (content_source(volume_id="non-existing-volume-id"), "volume"),
    ],
)
def test_create_volume_from_a_missing_source_is_not_found(
    csi: Csi, source: csi_pb2.VolumeContentSource, mention: str
) -> None:
    kind = Kind("block")
    req = restore_request(kind, snapshot_id=UNKNOWN_SNAPSHOT)
    req.volume_content_source.CopyFrom(source)
    csi.expect(csi.controller.CreateVolume, req, Code.NOT_FOUND, mention)


def test_create_volume_from_an_empty_content_source_is_invalid(csi: Csi) -> None:
    req = restore_request(Kind("block"), snapshot_id=UNKNOWN_SNAPSHOT)
    req.volume_content_source.Clear()
    req.volume_content_source.SetInParent()
    csi.expect(csi.controller.CreateVolume, req, Code.INVALID_ARGUMENT, "volume_content_source")


# ---- idempotency, listing, pagination --------------------------------------------------------


def test_create_snapshot_is_idempotent_by_name_and_refuses_it_for_another_source(
    csi: Csi,
) -> None:
    kind = Kind("block")
    one, other = csi.create_volume(kind), csi.create_volume(kind)
    name = "snapshot-" + "n" * 119  # csi-sanity: a maximum-length (128 byte) name works
    first = create_snapshot(csi, one.volume_id, name)
    again = create_snapshot(csi, one.volume_id, name)
    assert again.snapshot_id == first.snapshot_id
    assert again.creation_time == first.creation_time
    assert first.ready_to_use and first.source_volume_id == one.volume_id
    assert first.size_bytes == one.capacity_bytes and first.creation_time.seconds > 0
    csi.expect(
        csi.controller.CreateSnapshot,
        csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=other.volume_id),
        Code.ALREADY_EXISTS,
        one.volume_id,  # which volume the name is taken for
    )
    second_name = create_snapshot(csi, one.volume_id)
    assert second_name.snapshot_id != first.snapshot_id  # a second name is a new snapshot
    got = csi.controller.GetSnapshot(
        csi_pb2.GetSnapshotRequest(snapshot_id=first.snapshot_id), timeout=RPC_TIMEOUT
    ).snapshot
    assert got == first
    delete_snapshot(csi, first.snapshot_id)
    delete_snapshot(csi, first.snapshot_id)  # gone is done
    assert list_all(csi, snapshot_id=first.snapshot_id) == []


def test_list_snapshots_filters_by_id_and_source_and_pages_without_gaps_or_repeats(
    csi: Csi,
) -> None:
    kind = Kind("block")
    volume, other = csi.create_volume(kind), csi.create_volume(kind)
    made = [create_snapshot(csi, volume.volume_id).snapshot_id for _ in range(5)]
    elsewhere = create_snapshot(csi, other.volume_id)

    assert [s.snapshot_id for s in list_all(csi, snapshot_id=made[2])] == [made[2]]
    assert list_all(csi, snapshot_id=made[2], source_volume_id=other.volume_id) == []
    of_volume = list_all(csi, source_volume_id=volume.volume_id)
    assert sorted(s.snapshot_id for s in of_volume) == sorted(made)
    everything = {s.snapshot_id for s in list_all(csi)}
    assert set(made) | {elsewhere.snapshot_id} <= everything

    seen: list[str] = []
    token = ""
    for _ in range(10):
        reply = csi.controller.ListSnapshots(
            csi_pb2.ListSnapshotsRequest(
                max_entries=2, starting_token=token, source_volume_id=volume.volume_id
            ),
            timeout=RPC_TIMEOUT,
        )
        assert len(reply.entries) <= 2
        seen += [e.snapshot.snapshot_id for e in reply.entries]
        token = reply.next_token
        if not token:
            break
    assert sorted(seen) == sorted(made), "pages must cover every snapshot exactly once"

    # csi-sanity: a starting_token without max_entries returns all the rest at once
    first = csi.controller.ListSnapshots(
        csi_pb2.ListSnapshotsRequest(max_entries=2, source_volume_id=volume.volume_id),
        timeout=RPC_TIMEOUT,
    )
    rest = list_all(csi, starting_token=first.next_token, source_volume_id=volume.volume_id)
    assert len(first.entries) + len(rest) == len(made)


def test_list_snapshots_without_max_entries_returns_them_all_past_managements_page_size(
    csi: Csi,
) -> None:
    """max_entries 0 means no limit (the spec); management pages by 100 on its own."""
    volume = csi.create_volume(Kind("block"))
    made = {create_snapshot(csi, volume.volume_id).snapshot_id for _ in range(101)}
    reply = csi.controller.ListSnapshots(
        csi_pb2.ListSnapshotsRequest(source_volume_id=volume.volume_id), timeout=RPC_TIMEOUT
    )
    assert {e.snapshot.snapshot_id for e in reply.entries} == made
    assert reply.next_token == ""


# ---- data: snapshot -> restore -> clone ------------------------------------------------------


def test_restore_and_clone_hold_the_data_of_the_moment_the_snapshot_was_cut(
    csi: Csi, fs_kind: Kind
) -> None:
    """A restored filesystem is mounted as it is (never reformatted at NodeStage), next to
    its still-mounted source (XFS: the same UUID twice on one node)."""
    kind = fs_kind
    volume, pub = csi.provision(kind)
    before, before_digest = payload()
    write_data(kind, pub.target, before)
    snap = create_snapshot(csi, volume.volume_id)
    after, after_digest = payload()
    write_data(kind, pub.target, after)  # the source moves on; the snapshot must not

    restored = csi.create(restore_request(kind, snapshot_id=snap.snapshot_id)).volume
    assert restored.content_source.snapshot.snapshot_id == snap.snapshot_id
    assert restored.capacity_bytes == volume.capacity_bytes
    rpub = csi.publish_all(restored, kind)
    assert read_digest(kind, rpub.target) == before_digest
    assert read_digest(kind, pub.target) == after_digest

    third, third_digest = payload()
    write_data(kind, rpub.target, third, name="third.bin")
    csi.unpublish_all(rpub)
    bigger = 2 * kind.size
    clone = csi.create(restore_request(kind, volume_id=restored.volume_id, size=bigger)).volume
    assert clone.content_source.volume.volume_id == restored.volume_id
    assert clone.capacity_bytes == bigger
    cpub = csi.publish_all(clone, kind)
    if kind.is_block:  # a block "file" is offset 0: the third payload replaced the first
        assert read_digest(kind, cpub.target) == third_digest
    else:
        assert read_digest(kind, cpub.target) == before_digest
        assert read_digest(kind, cpub.target, name="third.bin") == third_digest
        # the source's filesystem was grown at NodeStage: the pod sees what it asked for
        st = os.statvfs(cpub.target)
        assert st.f_blocks * st.f_frsize > (bigger + kind.size) // 2


def test_restore_is_idempotent_by_name_and_source_and_refuses_a_smaller_limit(csi: Csi) -> None:
    kind = Kind("block")
    volume = csi.create_volume(kind, size=64 * MiB)
    snap = create_snapshot(csi, volume.volume_id)
    req = restore_request(kind, snapshot_id=snap.snapshot_id, size=64 * MiB)
    first = csi.create(req).volume
    again = csi.create(req).volume
    assert again.volume_id == first.volume_id
    other = csi_pb2.CreateVolumeRequest()
    other.CopyFrom(req)
    other.volume_content_source.CopyFrom(content_source(volume_id=volume.volume_id))
    csi.expect(csi.controller.CreateVolume, other, Code.ALREADY_EXISTS, "source")
    empty = csi_pb2.CreateVolumeRequest()
    empty.CopyFrom(req)
    empty.ClearField("volume_content_source")
    csi.expect(csi.controller.CreateVolume, empty, Code.ALREADY_EXISTS, "source")
    small = restore_request(kind, snapshot_id=snap.snapshot_id, size=32 * MiB, limit=32 * MiB)
    csi.expect(csi.controller.CreateVolume, small, Code.OUT_OF_RANGE, "limit_bytes")
    # a required size under the source's is met by the source's size (the range allows it)
    grown = csi.create(restore_request(kind, snapshot_id=snap.snapshot_id, size=16 * MiB)).volume
    assert grown.capacity_bytes == 64 * MiB


def test_a_snapshot_outlives_its_source_volume(csi: Csi) -> None:
    kind = Kind("block")
    volume, pub = csi.provision(kind)
    data, digest = payload()
    write_data(kind, pub.target, data)
    snap = create_snapshot(csi, volume.volume_id)
    csi.unpublish_all(pub)
    csi.delete_volume(volume.volume_id)
    got = csi.controller.GetSnapshot(
        csi_pb2.GetSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=RPC_TIMEOUT
    ).snapshot
    assert got.snapshot_id == snap.snapshot_id
    restored = csi.create(restore_request(kind, snapshot_id=snap.snapshot_id)).volume
    rpub = csi.publish_all(restored, kind)
    assert read_digest(kind, rpub.target) == digest
