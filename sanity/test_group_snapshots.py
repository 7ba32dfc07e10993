"""The GroupController service: volume group snapshots (CSI v1.12), as the
external-snapshotter's VolumeGroupSnapshot controller drives it.

Upstream csi-sanity's groupcontroller.go cases are here too: a missing name
or ID is INVALID_ARGUMENT; a made-up group ID without snapshot_ids is
NOT_FOUND on Get and OK on Delete.
"""

from __future__ import annotations

from sanity.support import (
    RPC_TIMEOUT,
    Code,
    Csi,
    Kind,
    csi_pb2,
    payload,
    read_digest,
    unique_name,
    write_data,
)
from sanity.test_snapshots import (
    UNKNOWN_VOLUME,
    delete_snapshot,
    remember_snapshot,
    restore_request,
)

_Service = csi_pb2.PluginCapability.Service
_GroupRpc = csi_pb2.GroupControllerServiceCapability.RPC
UNKNOWN_GROUP = "group-" + "0" * 32


def create_group(csi: Csi, volume_ids: list[str], name: str = "") -> csi_pb2.VolumeGroupSnapshot:
    req = csi_pb2.CreateVolumeGroupSnapshotRequest(
        name=name or unique_name("group"), source_volume_ids=volume_ids
    )
    group = csi.stack.group_controller.CreateVolumeGroupSnapshot(
        req, timeout=RPC_TIMEOUT
    ).group_snapshot
    members = [s.snapshot_id for s in group.snapshots]

    def undo() -> None:
        csi.stack.group_controller.DeleteVolumeGroupSnapshot(
            csi_pb2.DeleteVolumeGroupSnapshotRequest(
                group_snapshot_id=group.group_snapshot_id, snapshot_ids=members
            ),
            timeout=RPC_TIMEOUT,
        )

    csi.remember(("group", group.group_snapshot_id), undo)
    return group


def test_plugin_offers_the_group_controller_and_its_one_capability(csi: Csi) -> None:
    reply = csi.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    services = {c.service.type for c in reply.capabilities if c.HasField("service")}
    assert _Service.GROUP_CONTROLLER_SERVICE in services
    caps = csi.stack.group_controller.GroupControllerGetCapabilities(
        csi_pb2.GroupControllerGetCapabilitiesRequest()
    )
    assert [c.rpc.type for c in caps.capabilities] == [
        _GroupRpc.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT
    ]


def test_group_calls_refuse_missing_fields_and_answer_made_up_ids_as_the_spec_says(
    csi: Csi,
) -> None:
    gc = csi.stack.group_controller
    csi.expect(
        gc.CreateVolumeGroupSnapshot,
        csi_pb2.CreateVolumeGroupSnapshotRequest(source_volume_ids=[UNKNOWN_VOLUME]),
        Code.INVALID_ARGUMENT,
        "name",
    )
    csi.expect(
        gc.CreateVolumeGroupSnapshot,
        csi_pb2.CreateVolumeGroupSnapshotRequest(name="g"),
        Code.INVALID_ARGUMENT,
        "source_volume_ids",
    )
    csi.expect(
        gc.CreateVolumeGroupSnapshot,
        csi_pb2.CreateVolumeGroupSnapshotRequest(name="g", source_volume_ids=[UNKNOWN_VOLUME]),
        Code.NOT_FOUND,
        UNKNOWN_VOLUME,
    )
    csi.expect(
        gc.GetVolumeGroupSnapshot,
        csi_pb2.GetVolumeGroupSnapshotRequest(),
        Code.INVALID_ARGUMENT,
        "group_snapshot_id",
    )
    csi.expect(
        gc.DeleteVolumeGroupSnapshot,
        csi_pb2.DeleteVolumeGroupSnapshotRequest(),
        Code.INVALID_ARGUMENT,
        "group_snapshot_id",
    )
    for gid in (UNKNOWN_GROUP, "made-up-group"):
        csi.expect(
            gc.GetVolumeGroupSnapshot,
            csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=gid),
            Code.NOT_FOUND,
            "group",
        )
        gc.DeleteVolumeGroupSnapshot(
            csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=gid), timeout=RPC_TIMEOUT
        )


def test_group_snapshot_is_one_instant_of_every_member_and_goes_as_a_whole(csi: Csi) -> None:
    kind = Kind("block")
    gc = csi.stack.group_controller
    volumes, digests = [], []
    for _ in range(2):
        volume, pub = csi.provision(kind)
        data, digest = payload()
        write_data(kind, pub.target, data)
        volumes.append(volume.volume_id)
        digests.append(digest)
    name = unique_name("group")
    group = create_group(csi, volumes, name)
    members = {s.source_volume_id: s for s in group.snapshots}
    assert sorted(members) == sorted(volumes)
    assert group.ready_to_use and group.creation_time.seconds > 0
    for snap in group.snapshots:
        assert snap.group_snapshot_id == group.group_snapshot_id and snap.ready_to_use
    ids = [s.snapshot_id for s in group.snapshots]

    again = create_group(csi, list(reversed(volumes)), name)  # the same set, any order
    assert again.group_snapshot_id == group.group_snapshot_id
    csi.expect(
        gc.CreateVolumeGroupSnapshot,
        csi_pb2.CreateVolumeGroupSnapshotRequest(name=name, source_volume_ids=volumes[:1]),
        Code.ALREADY_EXISTS,
        volumes[1],  # the member set the name is taken for
    )
    got = gc.GetVolumeGroupSnapshot(
        csi_pb2.GetVolumeGroupSnapshotRequest(
            group_snapshot_id=group.group_snapshot_id, snapshot_ids=list(reversed(ids))
        ),
        timeout=RPC_TIMEOUT,
    ).group_snapshot
    assert got.group_snapshot_id == group.group_snapshot_id
    assert sorted(s.snapshot_id for s in got.snapshots) == sorted(ids)
    for wrong in ([ids[0]], [*ids, ids[0].replace("snap-", "snap-f")[:40]], []):
        csi.expect(
            gc.GetVolumeGroupSnapshot,
            csi_pb2.GetVolumeGroupSnapshotRequest(
                group_snapshot_id=group.group_snapshot_id, snapshot_ids=wrong
            ),
            Code.INVALID_ARGUMENT,
            "snapshot_ids",
        )
        csi.expect(
            gc.DeleteVolumeGroupSnapshot,
            csi_pb2.DeleteVolumeGroupSnapshotRequest(
                group_snapshot_id=group.group_snapshot_id, snapshot_ids=wrong
            ),
            Code.INVALID_ARGUMENT,
            "snapshot_ids",
        )
    # a member is not deleted alone: the spec's Snapshot.group_snapshot_id rule
    remember_snapshot(csi, ids[0])
    csi.expect(
        csi.controller.DeleteSnapshot,
        csi_pb2.DeleteSnapshotRequest(snapshot_id=ids[0]),
        Code.FAILED_PRECONDITION,
        group.group_snapshot_id,
    )
    csi.forget(("snapshot", ids[0]))

    # each member restores to its own volume's data
    snap = members[volumes[1]]
    restored = csi.create(restore_request(kind, snapshot_id=snap.snapshot_id)).volume
    rpub = csi.publish_all(restored, kind)
    assert read_digest(kind, rpub.target) == digests[1]

    request = csi_pb2.DeleteVolumeGroupSnapshotRequest(
        group_snapshot_id=group.group_snapshot_id, snapshot_ids=ids
    )
    gc.DeleteVolumeGroupSnapshot(request, timeout=RPC_TIMEOUT)
    csi.forget(("group", group.group_snapshot_id))
    gc.DeleteVolumeGroupSnapshot(request, timeout=RPC_TIMEOUT)  # gone is done
    csi.expect(
        gc.GetVolumeGroupSnapshot,
        csi_pb2.GetVolumeGroupSnapshotRequest(
            group_snapshot_id=group.group_snapshot_id, snapshot_ids=ids
        ),
        Code.NOT_FOUND,
        group.group_snapshot_id,
    )
    for sid in ids:  # the members went with the group
        csi.expect(
            csi.controller.GetSnapshot,
            csi_pb2.GetSnapshotRequest(snapshot_id=sid),
            Code.NOT_FOUND,
            sid,
        )
        delete_snapshot(csi, sid)  # and deleting one now is OK (gone)
