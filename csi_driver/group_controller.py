"""CSI GroupController service: volume group snapshots, cut at one instant by management.

Management freezes every staged filesystem member, cuts all the reflinks and
thaws them all (any failure thaws everything and leaves no partial group);
this service maps the CSI calls onto it, spec-exactly:

- CreateVolumeGroupSnapshot is idempotent by name with the same source
  volume set (in any order); another set -> ALREADY_EXISTS. A made-up
  source volume ID names nothing: NOT_FOUND.
- Get/DeleteVolumeGroupSnapshot check `snapshot_ids` against the group's
  members once the group is found: a different or missing list is the
  spec's "Snapshot list mismatch", INVALID_ARGUMENT, and nothing is deleted.
  A group that does not exist is NOT_FOUND (Get) or OK (Delete) whatever
  the list holds (see `validation.group_snapshot_ref`).
- Members carry group_snapshot_id, so DeleteSnapshot refuses them one by
  one (FAILED_PRECONDITION); the group goes as a whole.
"""

from __future__ import annotations

import logging

import grpc

from csi_driver import validation
from csi_driver._gen import csi_pb2, csi_pb2_grpc
from csi_driver.controller import csi_snapshot, csi_timestamp
from tessera.clients import ManagementClient
from tessera.errors import AlreadyExists, InvalidArgument, NotFound
from tessera.locks import VolumeLocks
from tessera.models import GroupSnapshot, GroupSnapshotCreate

log = logging.getLogger("tessera.csi.group_controller")

_Rpc = csi_pb2.GroupControllerServiceCapability.RPC
GROUP_CONTROLLER_CAPABILITIES = (_Rpc.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT,)


def csi_group_snapshot(group: GroupSnapshot) -> csi_pb2.VolumeGroupSnapshot:
    """ready_to_use only when every member is (the spec's MUST for false)."""
    return csi_pb2.VolumeGroupSnapshot(
        group_snapshot_id=group.id,
        snapshots=[csi_snapshot(s) for s in group.snapshots],
        creation_time=csi_timestamp(group.created_at),
        ready_to_use=group.ready_to_use and all(s.ready_to_use for s in group.snapshots),
    )


class GroupControllerServicer(csi_pb2_grpc.GroupControllerServicer):
    def __init__(self, management: ManagementClient, locks: VolumeLocks | None = None) -> None:
        self.mgmt = management
        self.locks = locks or VolumeLocks()

    def GroupControllerGetCapabilities(
        self,
        request: csi_pb2.GroupControllerGetCapabilitiesRequest,
        context: grpc.ServicerContext,
    ) -> csi_pb2.GroupControllerGetCapabilitiesResponse:
        return csi_pb2.GroupControllerGetCapabilitiesResponse(
            capabilities=[
                csi_pb2.GroupControllerServiceCapability(rpc=_Rpc(type=t))
                for t in GROUP_CONTROLLER_CAPABILITIES
            ]
        )

    def CreateVolumeGroupSnapshot(
        self, request: csi_pb2.CreateVolumeGroupSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateVolumeGroupSnapshotResponse:
        args = validation.create_group_snapshot(request)
        with self.locks.hold(f"group snapshot name {args.name}"):
            group = self.mgmt.create_group_snapshot(
                GroupSnapshotCreate(
                    name=args.name,
                    source_volume_ids=list(args.source_volume_ids),
                    parameters=args.parameters,
                )
            )
        have = sorted(s.source_volume_id for s in group.snapshots)
        if have != sorted(args.source_volume_ids):
            raise AlreadyExists(
                f"group snapshot {args.name!r} already exists for volumes {', '.join(have)}",
                field="name",
            )
        log.info("group snapshot %s is %s (%d members)", args.name, group.id, len(have))
        return csi_pb2.CreateVolumeGroupSnapshotResponse(group_snapshot=csi_group_snapshot(group))

    def GetVolumeGroupSnapshot(
        self, request: csi_pb2.GetVolumeGroupSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetVolumeGroupSnapshotResponse:
        args = validation.group_snapshot_ref(request)
        if not args.ours:
            raise NotFound(
                f"group_snapshot_id {args.group_snapshot_id[:80]!r} is not a Tessera group "
                "snapshot ID (expected group-<hex>)",
                field="group_snapshot_id",
            )
        group = self.mgmt.get_group_snapshot(args.group_snapshot_id)
        _check_members(group, args.snapshot_ids)
        return csi_pb2.GetVolumeGroupSnapshotResponse(group_snapshot=csi_group_snapshot(group))

    def DeleteVolumeGroupSnapshot(
        self, request: csi_pb2.DeleteVolumeGroupSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteVolumeGroupSnapshotResponse:
        args = validation.group_snapshot_ref(request)
        done = csi_pb2.DeleteVolumeGroupSnapshotResponse()
        if not args.ours:
            return done  # names no group of ours: gone is done
        with self.locks.hold(args.group_snapshot_id):
            try:
                group = self.mgmt.get_group_snapshot(args.group_snapshot_id)
                _check_members(group, args.snapshot_ids)
                self.mgmt.delete_group_snapshot(args.group_snapshot_id)
            except NotFound:
                pass  # already gone: the spec asks for OK
        return done


def _check_members(group: GroupSnapshot, snapshot_ids: tuple[str, ...]) -> None:
    """The spec's "Snapshot list mismatch": INVALID_ARGUMENT before anything is touched."""
    members = sorted(s.id for s in group.snapshots)
    if sorted(snapshot_ids) != members:
        given = ", ".join(snapshot_ids) or "none"
        raise InvalidArgument(
            f"snapshot_ids ({given}) do not match the members of group snapshot {group.id} "
            f"({', '.join(members)})",
            field="snapshot_ids",
        )
