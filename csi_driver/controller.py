"""CSI Controller service: CSI calls turned into management calls.

Every RPC first runs its validator from `csi_driver/validation.py` (required
fields, then their form, then IDs that cannot exist) and works only with the
request object it returns; it then holds the
per-volume lock (per name for CreateVolume) so concurrent calls for the same
volume get ABORTED instead of queueing, and raises `tessera.errors` types:
the status code is chosen in one place, `csi_driver/interceptor.py`.

Spec points where we had to choose (CSI v1.12):

- capacity_range: a negative value, both fields zero, or limit < required is
  a malformed request -> INVALID_ARGUMENT ("invalid field", general error
  scheme). OUT_OF_RANGE ("Unsupported capacity_range") is kept for
  well-formed ranges we cannot satisfy (too large, or the whole-MiB rounding
  passes limit_bytes), which management reports.
- DeleteVolume / ControllerUnpublishVolume of an unknown or foreign volume
  ID answer OK: the volume is gone, so it is deleted / unpublished.
- ControllerPublishVolume asks management to attach: it enforces the access
  mode across nodes and, for a node other than the volume's owner, has the
  owner export the volume to that node (docs/data-path.md). The answer's
  connection info, never a key, is publish_context.
- accessible_topology tells the truth: a volume of locality `any` or
  `preferred` is reachable from every node (over the network when remote),
  so it carries no constraint; `required` names its node, where it stays
  local. GetCapacity answers per topology segment the same way.
- Snapshots (docs/data-services.md, CSI): a foreign or unknown snapshot ID
  is NOT_FOUND (GetSnapshot, a content source), OK (DeleteSnapshot) or an
  empty list (ListSnapshots filters), as the spec's tables say. A group
  member carries group_snapshot_id, so it is not deleted alone
  (FAILED_PRECONDITION). A clone is at least its source's size
  (limit_bytes below it: OUT_OF_RANGE) and keeps its source's filesystem.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import grpc
from google.protobuf import timestamp_pb2, wrappers_pb2

from csi_driver import validation
from csi_driver._gen import csi_pb2, csi_pb2_grpc
from csi_driver.capabilities import Capability, parse_capabilities
from csi_driver.parameters import (
    CONTEXT_FS_TYPE,
    CONTEXT_LOCALITY,
    CONTEXT_MKFS_OPTIONS,
    StorageParameters,
    parse_mutable_parameters,
    parse_parameters,
)
from csi_driver.publish_context import to_publish_context
from tessera.clients import ManagementClient
from tessera.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
)
from tessera.layouts import is_mirrored
from tessera.locks import VolumeLocks
from tessera.models import (
    AccessMode,
    AccessType,
    ContentSource,
    Locality,
    Snapshot,
    SnapshotCreate,
    Volume,
    VolumeCreate,
    VolumeModify,
    VolumeState,
)
from tessera.topology import TOPOLOGY_KEY

log = logging.getLogger("tessera.csi.controller")

MiB = 1024**2

_Rpc = csi_pb2.ControllerServiceCapability.RPC
CONTROLLER_CAPABILITIES = (
    _Rpc.CREATE_DELETE_VOLUME,
    _Rpc.PUBLISH_UNPUBLISH_VOLUME,
    _Rpc.LIST_VOLUMES,
    _Rpc.GET_CAPACITY,
    _Rpc.EXPAND_VOLUME,
    _Rpc.LIST_VOLUMES_PUBLISHED_NODES,
    _Rpc.PUBLISH_READONLY,
    _Rpc.GET_VOLUME,
    _Rpc.VOLUME_CONDITION,
    _Rpc.SINGLE_NODE_MULTI_WRITER,
    _Rpc.CREATE_DELETE_SNAPSHOT,
    _Rpc.LIST_SNAPSHOTS,
    _Rpc.GET_SNAPSHOT,
    _Rpc.CLONE_VOLUME,
    _Rpc.MODIFY_VOLUME,
)

# ---- answers -----------------------------------------------------------------------


def volume_context(volume: Volume) -> dict[str, str]:
    return {
        CONTEXT_FS_TYPE: volume.parameters.get(CONTEXT_FS_TYPE, "ext4"),
        CONTEXT_MKFS_OPTIONS: volume.parameters.get(CONTEXT_MKFS_OPTIONS, ""),
    }


def csi_volume(volume: Volume) -> csi_pb2.Volume:
    return csi_pb2.Volume(
        volume_id=volume.id,
        capacity_bytes=volume.size_bytes,
        volume_context=volume_context(volume),
        accessible_topology=accessible_topology(volume),
        content_source=csi_content_source(volume.content_source),
    )


def csi_content_source(source: ContentSource | None) -> csi_pb2.VolumeContentSource | None:
    """The spec: "If specified in the CreateVolumeRequest, it MUST be in the response"."""
    if source is None:
        return None
    if source.snapshot_id:
        snap = csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=source.snapshot_id)
        return csi_pb2.VolumeContentSource(snapshot=snap)
    vol = csi_pb2.VolumeContentSource.VolumeSource(volume_id=source.volume_id)
    return csi_pb2.VolumeContentSource(volume=vol)


def csi_snapshot(snap: Snapshot) -> csi_pb2.Snapshot:
    """size_bytes is the source's size when cut: the smallest volume it can be restored to."""
    return csi_pb2.Snapshot(
        snapshot_id=snap.id,
        source_volume_id=snap.source_volume_id,
        size_bytes=snap.size_bytes,
        creation_time=csi_timestamp(snap.created_at),
        ready_to_use=snap.ready_to_use,
        group_snapshot_id=snap.group_snapshot_id,
    )


def csi_timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    whole = int(seconds)
    stamp.seconds, stamp.nanos = whole, int(round((seconds - whole) * 1e9)) % 10**9
    return stamp


def accessible_topology(volume: Volume) -> list[csi_pb2.Topology]:
    """Where the volume can be used: its own node for locality=required, else anywhere.

    The spec reads an empty list as "accessible from all nodes", which is
    what remote attach makes true; a locality=required volume is never
    exported, so it is accessible on the nodes of its legs only.
    """
    if volume.parameters.get(CONTEXT_LOCALITY, Locality.ANY.value) != Locality.REQUIRED.value:
        return []
    nodes = dict.fromkeys(leg.node_id for leg in volume.legs) or {volume.node_id: None}
    return [csi_pb2.Topology(segments={TOPOLOGY_KEY: node}) for node in nodes]


def volume_condition(volume: Volume) -> csi_pb2.VolumeCondition:
    if volume.condition:
        return csi_pb2.VolumeCondition(abnormal=True, message=volume.condition)
    if volume.state == VolumeState.ERROR:
        return csi_pb2.VolumeCondition(
            abnormal=True,
            message=f"volume is in error state on node {volume.node_id} pool {volume.pool}",
        )
    if volume.state == VolumeState.AVAILABLE:
        return csi_pb2.VolumeCondition(abnormal=False, message="ok")
    return csi_pb2.VolumeCondition(abnormal=False, message=f"volume is {volume.state.value}")


# ---- the service -------------------------------------------------------------------


class ControllerServicer(csi_pb2_grpc.ControllerServicer):
    def __init__(self, management: ManagementClient, locks: VolumeLocks | None = None) -> None:
        self.mgmt = management
        self.locks = locks or VolumeLocks()

    # -- create / delete --

    def CreateVolume(
        self, request: csi_pb2.CreateVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateVolumeResponse:
        args = validation.create_volume(request)
        name, params, requisite = args.name, args.params, list(args.requisite)
        self._refuse_mirrored_multi_writer(params.vpg, args.capabilities)
        with self.locks.hold(f"volume name {name}"), _vpg_is_a_parameter():
            size, params = args.size, args.params
            if args.source is not None:
                size, params = self._clone_size_and_params(args)
            volume = self.mgmt.create_volume(
                VolumeCreate(
                    name=name,
                    size_bytes=size,
                    limit_bytes=args.limit,
                    vpg=params.vpg,
                    locality=params.locality,
                    requisite_nodes=requisite,
                    preferred_nodes=list(args.preferred),
                    parameters=params.stored(),
                    content_source=args.source,
                    qos=params.qos,
                )
            )
        _check_same_volume(volume, params, requisite)
        _check_same_source(volume, args.source)
        if volume.state == VolumeState.ERROR:
            raise Internal(f"volume {name!r} ({volume.id}) is in error state", field="name")
        if volume.state != VolumeState.AVAILABLE:
            raise Aborted(f"volume {name!r} is {volume.state.value}; retry later", field="name")
        log.info(
            "volume %s is %s (%d bytes on %s)", name, volume.id, volume.size_bytes, volume.node_id
        )
        return csi_pb2.CreateVolumeResponse(volume=csi_volume(volume))

    def _refuse_mirrored_multi_writer(self, vpg: str, capabilities: tuple[Capability, ...]) -> None:
        """INVALID_ARGUMENT for MULTI_NODE_MULTI_WRITER on a mirrored (raid1/raid10) vpg.

        md keeps a mirror's state (bitmap, event counts) in the one kernel
        that composes it: two nodes writing through two md instances would
        let the copies diverge silently. Striped and one-leg vpgs take it.
        """
        if all(c.access_mode != AccessMode.MULTI_NODE_MULTI_WRITER for c in capabilities):
            return
        found = next((v for v in self.mgmt.list_vpgs().items if v.name == vpg), None)
        if found is not None and is_mirrored(found.layout):
            raise InvalidArgument(
                f"volume_capabilities: MULTI_NODE_MULTI_WRITER is refused for vpg {vpg!r} "
                f"(layout {found.layout}): a mirror is composed by md on one node at a time, "
                "and two nodes writing its legs would let the copies silently diverge; use a "
                "single-writer access mode, or a raid0/concat vpg",
                field="volume_capabilities",
            )

    def _clone_size_and_params(
        self, args: validation.CreateVolume
    ) -> tuple[int, StorageParameters]:
        """The clone's size (the source's unless the range asks for more) and filesystem.

        NOT_FOUND for a missing source; OUT_OF_RANGE when limit_bytes is smaller
        than the source (a clone cannot lose data). A clone holds the source's
        filesystem, so the StorageClass may not name another one.
        """
        source = args.source
        assert source is not None
        if source.snapshot_id:
            snap = self.mgmt.get_snapshot(source.snapshot_id)
            source_size, fs_type = snap.size_bytes, self._fs_type_of(snap.source_volume_id)
            what = f"snapshot {snap.id}"
        else:
            vol = self.mgmt.get_volume(source.volume_id)
            source_size, fs_type = vol.size_bytes, vol.parameters.get(CONTEXT_FS_TYPE, "")
            what = f"volume {vol.id}"
        if args.limit and args.limit < source_size:
            raise OutOfRange(
                f"capacity_range.limit_bytes ({args.limit}) is smaller than the source "
                f"{what} ({source_size} bytes); a clone is at least as large as its source",
                field="capacity_range",
            )
        size = max(args.size, source_size) if args.sized else source_size
        return size, _source_filesystem(args.params, fs_type, what)

    def _fs_type_of(self, volume_id: str) -> str:
        """The filesystem a snapshot's source volume was made with ("" once it is deleted)."""
        try:
            return self.mgmt.get_volume(volume_id).parameters.get(CONTEXT_FS_TYPE, "")
        except NotFound:
            return ""

    def DeleteVolume(
        self, request: csi_pb2.DeleteVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteVolumeResponse:
        args = validation.delete_volume(request)
        if not args.ours:
            return csi_pb2.DeleteVolumeResponse()  # not one of ours: nothing to delete
        with self.locks.hold(args.volume_id):
            try:
                self.mgmt.delete_volume(args.volume_id)
            except NotFound:
                pass  # already gone: the spec asks for OK
        return csi_pb2.DeleteVolumeResponse()

    # -- publish / unpublish --

    def ControllerPublishVolume(
        self, request: csi_pb2.ControllerPublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerPublishVolumeResponse:
        args = validation.controller_publish(request)
        with self.locks.hold(args.volume_id):
            volume = self.mgmt.get_volume(args.volume_id)
            node = self.mgmt.get_node(args.node_id)
            _check_filesystem(volume, request.volume_capability)
            _check_reachable(volume, node.id)
            attachment = self.mgmt.attach(
                args.volume_id, node.id, args.capability.access_mode, args.readonly
            )
        return csi_pb2.ControllerPublishVolumeResponse(
            publish_context=to_publish_context(attachment.connection, attachment.readonly)
        )

    def ControllerUnpublishVolume(
        self, request: csi_pb2.ControllerUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerUnpublishVolumeResponse:
        args = validation.controller_unpublish(request)
        done = csi_pb2.ControllerUnpublishVolumeResponse()
        if not args.ours:
            return done  # names no volume (or no node), so it is published nowhere
        volume_id = args.volume_id
        with self.locks.hold(volume_id):
            try:
                if args.node_id:
                    nodes = [args.node_id]
                else:
                    nodes = [a.node_id for a in self.mgmt.list_attachments(volume_id)]
                for node_id in nodes:
                    self.mgmt.detach(volume_id, node_id)
            except NotFound:
                # DeleteVolume refuses while attached, so a volume that is gone
                # is published nowhere: safely regarded as unpublished.
                pass
        return done

    # -- queries --

    def ValidateVolumeCapabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        args = validation.validate_volume_capabilities(request)
        volume = self.mgmt.get_volume(args.volume_id)
        try:
            capabilities = parse_capabilities(request.volume_capabilities)
            for raw in request.volume_capabilities:
                _check_filesystem(volume, raw)
            parse_parameters(request.parameters)
            # what CreateVolume refuses is not confirmed either
            self._refuse_mirrored_multi_writer(volume.vpg, tuple(capabilities))
        except InvalidArgument as err:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=err.message)
        return csi_pb2.ValidateVolumeCapabilitiesResponse(
            confirmed=csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context=request.volume_context,
                volume_capabilities=request.volume_capabilities,
                parameters=request.parameters,
            )
        )

    def ListVolumes(
        self, request: csi_pb2.ListVolumesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ListVolumesResponse:
        args = validation.list_volumes(request)
        try:
            page = self.mgmt.list_volumes(
                page_token=args.starting_token, max_entries=args.max_entries
            )
        except InvalidArgument as err:
            if args.starting_token and err.field == "page_token":
                raise Aborted(
                    "starting_token is not valid; start listing again without one",
                    field="starting_token",
                ) from err
            raise
        Entry = csi_pb2.ListVolumesResponse.Entry
        Status = csi_pb2.ListVolumesResponse.VolumeStatus
        return csi_pb2.ListVolumesResponse(
            entries=[
                Entry(
                    volume=csi_volume(v),
                    status=Status(
                        published_node_ids=v.published_nodes, volume_condition=volume_condition(v)
                    ),
                )
                for v in page.items
            ],
            next_token=page.next_token,
        )

    def GetCapacity(
        self, request: csi_pb2.GetCapacityRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetCapacityResponse:
        args = validation.get_capacity(request)
        params, nodes, unsupported = args.params, args.nodes, args.unsupported
        if unsupported:
            # no volume with these capabilities can be made anywhere
            log.info("GetCapacity: 0 for unsupported capabilities: %s", unsupported)
            return csi_pb2.GetCapacityResponse(available_capacity=0)
        try:  # a mirrored vpg takes no MULTI_NODE_MULTI_WRITER volume (CreateVolume refuses)
            if request.volume_capabilities:  # optional in GetCapacity
                capabilities = tuple(parse_capabilities(request.volume_capabilities))
                self._refuse_mirrored_multi_writer(params.vpg, capabilities)
        except InvalidArgument as err:
            log.info("GetCapacity: 0: %s", err.message)
            return csi_pb2.GetCapacityResponse(available_capacity=0)
        with _vpg_is_a_parameter():
            try:
                cap = self.mgmt.capacity(
                    vpg=params.vpg, node_id=nodes[0] if nodes else "", locality=params.locality
                )
            except NotFound as err:
                if err.field == "node_id":
                    return csi_pb2.GetCapacityResponse(available_capacity=0)
                raise
        return csi_pb2.GetCapacityResponse(
            available_capacity=cap.available_bytes,
            maximum_volume_size=wrappers_pb2.Int64Value(value=cap.maximum_volume_bytes),
            # volumes are allocated in whole MiB: a smaller limit cannot be met
            minimum_volume_size=wrappers_pb2.Int64Value(value=max(cap.minimum_volume_bytes, MiB)),
        )

    def ControllerGetVolume(
        self, request: csi_pb2.ControllerGetVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetVolumeResponse:
        args = validation.controller_get_volume(request)
        volume = self.mgmt.get_volume(args.volume_id)
        return csi_pb2.ControllerGetVolumeResponse(
            volume=csi_volume(volume),
            status=csi_pb2.ControllerGetVolumeResponse.VolumeStatus(
                published_node_ids=volume.published_nodes,
                volume_condition=volume_condition(volume),
            ),
        )

    def ControllerExpandVolume(
        self, request: csi_pb2.ControllerExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerExpandVolumeResponse:
        args = validation.controller_expand_volume(request)
        with self.locks.hold(args.volume_id):
            # management never shrinks: a smaller size answers the current one
            volume = self.mgmt.expand_volume(args.volume_id, args.size, args.limit)
        cap = args.capability
        block = cap is not None and cap.access_type == AccessType.BLOCK
        return csi_pb2.ControllerExpandVolumeResponse(
            capacity_bytes=volume.size_bytes, node_expansion_required=not block
        )

    def ControllerModifyVolume(
        self, request: csi_pb2.ControllerModifyVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerModifyVolumeResponse:
        """QoS limits, live on every node of the data path (docs/data-services.md, QoS).

        Only the keys given change, over the volume's current limits; the same
        request again is a no-op. Management answers UNAVAILABLE while a node
        that uses the volume cannot be told (the limits are stored, and the
        retry the resizer makes delivers them).
        """
        args = validation.controller_modify_volume(request)
        with self.locks.hold(args.volume_id):
            volume = self.mgmt.get_volume(args.volume_id)
            limits = parse_mutable_parameters(args.mutable_parameters, volume.qos)
            self.mgmt.modify_volume(args.volume_id, VolumeModify(qos=limits))
        return csi_pb2.ControllerModifyVolumeResponse()

    # -- snapshots --

    def CreateSnapshot(
        self, request: csi_pb2.CreateSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateSnapshotResponse:
        """A reflink copy cut by management on the source's node; idempotent by name.

        Management answers the same snapshot for the same name and source,
        AlreadyExists for another source, NotFound for a missing source.
        """
        args = validation.create_snapshot(request)
        with self.locks.hold(f"snapshot name {args.name}"):
            snap = self.mgmt.create_snapshot(
                SnapshotCreate(
                    name=args.name,
                    source_volume_id=args.source_volume_id,
                    parameters=args.parameters,
                )
            )
        if snap.source_volume_id != args.source_volume_id:
            raise AlreadyExists(
                f"snapshot {args.name!r} already exists for volume {snap.source_volume_id}",
                field="name",
            )
        log.info("snapshot %s is %s of %s", args.name, snap.id, snap.source_volume_id)
        return csi_pb2.CreateSnapshotResponse(snapshot=csi_snapshot(snap))

    def DeleteSnapshot(
        self, request: csi_pb2.DeleteSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteSnapshotResponse:
        """Gone is done (OK); a member of a group snapshot goes with its group only.

        We report group_snapshot_id on members, and the spec's Snapshot message
        says such a snapshot "MUST NOT be deleted as a stand alone snapshot":
        FAILED_PRECONDITION ("Snapshot in use") naming the group.
        """
        args = validation.delete_snapshot(request)
        done = csi_pb2.DeleteSnapshotResponse()
        if not args.ours:
            return done
        with self.locks.hold(args.snapshot_id):
            try:
                snap = self.mgmt.get_snapshot(args.snapshot_id)
                if snap.group_snapshot_id:
                    raise FailedPrecondition(
                        f"snapshot {snap.id} belongs to group snapshot "
                        f"{snap.group_snapshot_id}; delete the group instead",
                        field="snapshot_id",
                    )
                self.mgmt.delete_snapshot(args.snapshot_id)
            except NotFound:
                pass  # already gone: the spec asks for OK
        return done

    def GetSnapshot(
        self, request: csi_pb2.GetSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetSnapshotResponse:
        args = validation.get_snapshot(request)
        snap = self.mgmt.get_snapshot(args.snapshot_id)
        return csi_pb2.GetSnapshotResponse(snapshot=csi_snapshot(snap))

    def ListSnapshots(
        self, request: csi_pb2.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ListSnapshotsResponse:
        """Filters that name nothing give an empty list (the spec: "not an error")."""
        args = validation.list_snapshots(request)
        if args.names_nothing:
            return csi_pb2.ListSnapshotsResponse()
        if args.snapshot_id:
            snaps = self._snapshot_by_id(args.snapshot_id, args.source_volume_id)
            return _snapshot_list(snaps, "")
        try:
            page = self.mgmt.list_snapshots(
                page_token=args.starting_token,
                max_entries=args.max_entries,
                source_volume_id=args.source_volume_id,
            )
        except InvalidArgument as err:
            if args.starting_token and err.field == "page_token":
                raise Aborted(
                    "starting_token is not valid; start listing again without one",
                    field="starting_token",
                ) from err
            raise
        items, token = list(page.items), page.next_token
        # max_entries 0 is "no restriction" (the spec; csi-sanity expects the rest at
        # once), while management pages by 100 then: follow its pages to the end
        while token and not args.max_entries:
            page = self.mgmt.list_snapshots(
                page_token=token, source_volume_id=args.source_volume_id
            )
            items += page.items
            token = page.next_token
        return _snapshot_list(items, token)

    def _snapshot_by_id(self, snapshot_id: str, source_volume_id: str) -> list[Snapshot]:
        try:
            snap = self.mgmt.get_snapshot(snapshot_id)
        except NotFound:
            return []
        if source_volume_id and snap.source_volume_id != source_volume_id:
            return []
        return [snap]

    def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        return csi_pb2.ControllerGetCapabilitiesResponse(
            capabilities=[
                csi_pb2.ControllerServiceCapability(rpc=_Rpc(type=t))
                for t in CONTROLLER_CAPABILITIES
            ]
        )


# ---- helpers -----------------------------------------------------------------------


def _snapshot_list(snaps: list[Snapshot], next_token: str) -> csi_pb2.ListSnapshotsResponse:
    Entry = csi_pb2.ListSnapshotsResponse.Entry
    return csi_pb2.ListSnapshotsResponse(
        entries=[Entry(snapshot=csi_snapshot(s)) for s in snaps], next_token=next_token
    )


def _source_filesystem(params: StorageParameters, fs_type: str, what: str) -> StorageParameters:
    """A clone keeps its source's filesystem: NodeStage mounts it and never formats it."""
    if not fs_type:
        return params
    if params.fs_type_given and params.fs_type != fs_type:
        raise InvalidArgument(
            f"the source {what} holds {fs_type}; the request asks for {params.fs_type} "
            "(a clone keeps its source's filesystem)",
            field="parameters",
        )
    return replace(params, fs_type=fs_type, fs_type_given=True)


def _check_same_source(volume: Volume, source: ContentSource | None) -> None:
    """An existing volume of this name answers only if it came from the same source."""
    if volume.content_source != source:
        had = volume.content_source.model_dump() if volume.content_source else "no source"
        raise AlreadyExists(
            f"volume {volume.name!r} already exists with content source {had}",
            field="volume_content_source",
        )


def _check_reachable(volume: Volume, node_id: str) -> None:
    """A locality=required volume is used on its own node only: it is never exported."""
    if node_id in (leg.node_id for leg in volume.legs) or node_id == volume.node_id:
        return
    if volume.parameters.get(CONTEXT_LOCALITY) == Locality.REQUIRED.value:
        raise FailedPrecondition(
            f"volume {volume.id} has locality=required and lives on node {volume.node_id}; "
            f"it is not accessible from node {node_id}",
            field="node_id",
        )


def _check_filesystem(volume: Volume, cap: csi_pb2.VolumeCapability) -> None:
    """A mount capability that names a filesystem must name the volume's own.

    An empty fs_type means "the volume's" (volume_context fsType), so only
    an explicit, different one is refused.
    """
    asked = cap.mount.fs_type if cap.HasField("mount") else ""
    made = volume.parameters.get(CONTEXT_FS_TYPE, "")
    if asked and made and asked != made:
        raise InvalidArgument(
            f"volume {volume.id} is made for {made}; the capability asks for {asked}",
            field="volume_capability",
        )


@contextmanager
def _vpg_is_a_parameter() -> Iterator[None]:
    """A missing volume provisioning group is a StorageClass mistake, not a missing volume."""
    try:
        yield
    except NotFound as err:
        if err.field != "vpg":
            raise
        raise InvalidArgument(f"parameters.vpg: {err.message}", field="parameters") from err


def _check_same_volume(volume: Volume, params: StorageParameters, requisite: list[str]) -> None:
    """Management matches names on size and vpg; the filesystem and placement matter too."""
    for key, wanted in params.volume_context().items():
        have = volume.parameters.get(key, "")
        if have != wanted:
            raise AlreadyExists(
                f"volume {volume.name!r} already exists with {key}={have!r}, not {wanted!r}",
                field="parameters",
            )
    if requisite and volume.node_id not in requisite:
        raise AlreadyExists(
            f"volume {volume.name!r} already exists on node {volume.node_id}, which is not "
            f"one of the requisite nodes ({', '.join(requisite)})",
            field="accessibility_requirements",
        )
