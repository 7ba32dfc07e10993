"""CSI Controller service: CSI calls turned into management calls.

Every RPC validates its request completely before acting, holds the
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
- ControllerPublishVolume to a node other than the volume's owner records
  the attachment (management enforces the access mode across nodes) and
  answers publish_context transport=nbd. The node side of remote attach is
  the next transport; until it lands NodeStage on such a node answers
  FAILED_PRECONDITION, and accessible_topology names the owner node only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import grpc
from google.protobuf import wrappers_pb2

from csi_driver import TOPOLOGY_KEY
from csi_driver._gen import csi_pb2, csi_pb2_grpc
from csi_driver.capabilities import Capability, parse_capabilities, parse_capability
from csi_driver.locks import VolumeLocks
from csi_driver.parameters import (
    CONTEXT_FS_TYPE,
    CONTEXT_MKFS_OPTIONS,
    StorageParameters,
    parse_parameters,
)
from tessera import ids
from tessera.clients import ManagementClient
from tessera.errors import (
    Aborted,
    AlreadyExists,
    Internal,
    InvalidArgument,
    NotFound,
)
from tessera.models import (
    AccessType,
    GiB,
    Locality,
    Volume,
    VolumeCreate,
    VolumeState,
)

log = logging.getLogger("tessera.csi.controller")

MiB = 1024**2
DEFAULT_SIZE = GiB
#: CSI's general string size limit (bytes)
MAX_NAME_BYTES = 128

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
)

# U+0000-U+0008, U+000B, U+000C, U+000E-U+001F, U+007F-U+009F (CreateVolumeRequest.name)
_BANNED_NAME_CHARS = frozenset(
    [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0)]
)


# ---- request checks ----------------------------------------------------------------


def check_name(name: str) -> str:
    if not name:
        raise InvalidArgument("name is required", field="name")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise InvalidArgument(
            f"name is {len(name.encode())} bytes long; at most {MAX_NAME_BYTES} are allowed",
            field="name",
        )
    if any(ord(c) in _BANNED_NAME_CHARS for c in name):
        raise InvalidArgument("name must not contain control characters", field="name")
    return name


def parse_capacity(
    request: csi_pb2.CreateVolumeRequest | csi_pb2.ControllerExpandVolumeRequest,
    *,
    required: bool,
) -> tuple[int, int]:
    """(size to ask for, limit or 0) from a request's capacity_range."""
    fld = "capacity_range"
    if not request.HasField(fld):
        if required:
            raise InvalidArgument(f"{fld} is required", field=fld)
        return DEFAULT_SIZE, 0
    want, limit = request.capacity_range.required_bytes, request.capacity_range.limit_bytes
    if want < 0:
        raise InvalidArgument(f"{fld}.required_bytes must not be negative ({want})", field=fld)
    if limit < 0:
        raise InvalidArgument(f"{fld}.limit_bytes must not be negative ({limit})", field=fld)
    if want == 0 and limit == 0:
        raise InvalidArgument(f"{fld}: set required_bytes, limit_bytes or both", field=fld)
    if limit and want > limit:
        raise InvalidArgument(
            f"{fld}.limit_bytes ({limit}) is smaller than required_bytes ({want})", field=fld
        )
    if want:
        return want, limit
    # only a limit: the default size if it fits, else as much as the limit allows
    return (min(DEFAULT_SIZE, limit) if not required else limit), limit


def _require_volume_id(value: str) -> str:
    """Empty -> INVALID_ARGUMENT; malformed -> NOT_FOUND (it cannot name a volume)."""
    return ids.check_volume_id(value, "volume_id", missing_is_not_found=True)


def _check_required_capability_fields(caps: Sequence[csi_pb2.VolumeCapability], fld: str) -> None:
    """Missing REQUIRED sub-fields are INVALID_ARGUMENT even where unsupported ones are not."""
    if not caps:
        raise InvalidArgument(f"{fld} is required: give at least one capability", field=fld)
    for i, cap in enumerate(caps):
        if cap.WhichOneof("access_type") is None:
            raise InvalidArgument(f"{fld}[{i}].access_type: set either block or mount", field=fld)
        if cap.access_mode.mode == csi_pb2.VolumeCapability.AccessMode.UNKNOWN:
            raise InvalidArgument(f"{fld}[{i}].access_mode: an access mode is required", field=fld)


def _resolve_fs_type(
    params: StorageParameters, caps: Sequence[csi_pb2.VolumeCapability]
) -> StorageParameters:
    """One filesystem for the volume: the StorageClass's, or the mount capability's.

    The external-provisioner moves `csi.storage.k8s.io/fstype` into the mount
    capability's fs_type, so both places are honoured; they must agree.
    """
    asked = sorted({c.mount.fs_type for c in caps if c.HasField("mount") and c.mount.fs_type})
    if len(asked) > 1:
        raise InvalidArgument(
            f"volume_capabilities ask for different filesystems ({', '.join(asked)}); "
            "a volume has one",
            field="volume_capabilities",
        )
    if not asked:
        return params
    if params.fs_type_given and params.fs_type != asked[0]:
        raise InvalidArgument(
            f"parameters.csi.storage.k8s.io/fstype is {params.fs_type} but the mount "
            f"capability asks for {asked[0]}",
            field="parameters",
        )
    return StorageParameters(
        vpg=params.vpg,
        fs_type=asked[0],
        fs_type_given=True,
        mkfs_options=params.mkfs_options,
        locality=params.locality,
        sidecar=params.sidecar,
    )


def topology_nodes(topologies: Iterable[csi_pb2.Topology]) -> list[str]:
    """Node ids named by topology segments, in order, without duplicates.

    Segments without our node key (e.g. only a zone) cannot be turned into
    nodes; every Tessera node reports the node key, so the CO's requisite
    list always carries it.
    """
    out: list[str] = []
    for topo in topologies:
        node = topo.segments.get(TOPOLOGY_KEY, "")
        if node and node not in out:
            out.append(ids.check_node_id(node, f"topology segment {TOPOLOGY_KEY}"))
    return out


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
        accessible_topology=[csi_pb2.Topology(segments={TOPOLOGY_KEY: volume.node_id})],
    )


def volume_condition(volume: Volume) -> csi_pb2.VolumeCondition:
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
        name = check_name(request.name)
        _check_required_capability_fields(request.volume_capabilities, "volume_capabilities")
        parse_capabilities(request.volume_capabilities)
        size, limit = parse_capacity(request, required=False)
        params = _resolve_fs_type(parse_parameters(request.parameters), request.volume_capabilities)
        if request.HasField("volume_content_source"):
            kind = request.volume_content_source.WhichOneof("type") or "source"
            raise InvalidArgument(
                f"volume_content_source: creating a volume from a {kind} is not supported "
                "yet (this driver does not offer snapshots or clones); create it empty",
                field="volume_content_source",
            )
        requisite = topology_nodes(request.accessibility_requirements.requisite)
        preferred = topology_nodes(request.accessibility_requirements.preferred)
        if params.locality == Locality.REQUIRED and preferred:
            consumer = preferred[0]
            if requisite and consumer not in requisite:
                raise InvalidArgument(
                    f"locality=required: the preferred node {consumer} is not one of the "
                    "requisite nodes",
                    field="accessibility_requirements",
                )
            requisite = [consumer]

        with self.locks.hold(f"volume name {name}"), _vpg_is_a_parameter():
            volume = self.mgmt.create_volume(
                VolumeCreate(
                    name=name,
                    size_bytes=size,
                    limit_bytes=limit,
                    vpg=params.vpg,
                    locality=params.locality,
                    requisite_nodes=requisite,
                    preferred_nodes=preferred,
                    parameters=params.stored(),
                )
            )
        _check_same_volume(volume, params, requisite)
        if volume.state == VolumeState.ERROR:
            raise Internal(f"volume {name!r} ({volume.id}) is in error state", field="name")
        if volume.state != VolumeState.AVAILABLE:
            raise Aborted(f"volume {name!r} is {volume.state.value}; retry later", field="name")
        log.info(
            "volume %s is %s (%d bytes on %s)", name, volume.id, volume.size_bytes, volume.node_id
        )
        return csi_pb2.CreateVolumeResponse(volume=csi_volume(volume))

    def DeleteVolume(
        self, request: csi_pb2.DeleteVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required", field="volume_id")
        if not ids.is_volume_id(request.volume_id):
            return csi_pb2.DeleteVolumeResponse()  # not one of ours: nothing to delete
        with self.locks.hold(request.volume_id):
            try:
                self.mgmt.delete_volume(request.volume_id)
            except NotFound:
                pass  # already gone: the spec asks for OK
        return csi_pb2.DeleteVolumeResponse()

    # -- publish / unpublish --

    def ControllerPublishVolume(
        self, request: csi_pb2.ControllerPublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerPublishVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required", field="volume_id")
        if not request.node_id:
            raise InvalidArgument("node_id is required", field="node_id")
        if not request.HasField("volume_capability"):
            raise InvalidArgument("volume_capability is required", field="volume_capability")
        cap = parse_capability(request.volume_capability)
        volume_id = _require_volume_id(request.volume_id)
        node_id = _known_node_id(request.node_id)
        # a reader-only mode is read-only whatever the flag says; a writer mode
        # published readonly=true is a read-only publish (PUBLISH_READONLY)
        readonly = request.readonly or cap.read_only_mode

        with self.locks.hold(volume_id):
            volume = self.mgmt.get_volume(volume_id)
            node = self.mgmt.get_node(node_id)
            _check_filesystem(volume, request.volume_capability)
            # Another node gets an attachment record too, so the access-mode
            # rules hold across nodes; its NodeStage needs the nbd transport.
            local = volume.node_id == node.id
            attachment = self.mgmt.attach(volume_id, node.id, cap.access_mode, readonly)
        return csi_pb2.ControllerPublishVolumeResponse(
            publish_context={
                "transport": "loop" if local else "nbd",
                "ownerNode": volume.node_id,
                "readonly": "true" if attachment.readonly else "false",
            }
        )

    def ControllerUnpublishVolume(
        self, request: csi_pb2.ControllerUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerUnpublishVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required", field="volume_id")
        done = csi_pb2.ControllerUnpublishVolumeResponse()
        if not ids.is_volume_id(request.volume_id):
            return done  # cannot name a volume, so it is published nowhere
        if request.node_id and not _is_node_id(request.node_id):
            return done  # cannot name a node, so the volume is not published there
        volume_id = request.volume_id
        with self.locks.hold(volume_id):
            try:
                if request.node_id:
                    nodes = [request.node_id]
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
        if not request.volume_id:
            raise InvalidArgument("volume_id is required", field="volume_id")
        _check_required_capability_fields(request.volume_capabilities, "volume_capabilities")
        volume = self.mgmt.get_volume(_require_volume_id(request.volume_id))
        try:
            parse_capabilities(request.volume_capabilities)
            for raw in request.volume_capabilities:
                _check_filesystem(volume, raw)
            parse_parameters(request.parameters)
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
        if request.max_entries < 0:
            raise InvalidArgument(
                f"max_entries must not be negative ({request.max_entries})", field="max_entries"
            )
        try:
            page = self.mgmt.list_volumes(
                page_token=request.starting_token, max_entries=request.max_entries
            )
        except InvalidArgument as err:
            if request.starting_token and err.field == "page_token":
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
        params = parse_parameters(request.parameters)
        nodes = topology_nodes([request.accessible_topology])
        unsupported = ""
        if request.volume_capabilities:
            _check_required_capability_fields(request.volume_capabilities, "volume_capabilities")
            try:
                parse_capabilities(request.volume_capabilities)
            except InvalidArgument as err:
                unsupported = err.message
        if unsupported:
            # no volume with these capabilities can be made anywhere
            log.info("GetCapacity: 0 for unsupported capabilities: %s", unsupported)
            return csi_pb2.GetCapacityResponse(available_capacity=0)
        with _vpg_is_a_parameter():
            try:
                cap = self.mgmt.capacity(vpg=params.vpg, node_id=nodes[0] if nodes else "")
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
        volume = self.mgmt.get_volume(_require_volume_id(request.volume_id))
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
        if not request.volume_id:
            raise InvalidArgument("volume_id is required", field="volume_id")
        size, limit = parse_capacity(request, required=True)
        cap: Capability | None = None
        if request.HasField("volume_capability"):
            cap = parse_capability(request.volume_capability)
        volume_id = _require_volume_id(request.volume_id)
        with self.locks.hold(volume_id):
            # management never shrinks: a smaller size answers the current one
            volume = self.mgmt.expand_volume(volume_id, size, limit)
        block = cap is not None and cap.access_type == AccessType.BLOCK
        return csi_pb2.ControllerExpandVolumeResponse(
            capacity_bytes=volume.size_bytes, node_expansion_required=not block
        )

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


def _is_node_id(value: str) -> bool:
    try:
        ids.check_node_id(value)
    except InvalidArgument:
        return False
    return True


def _known_node_id(value: str) -> str:
    """A node id that cannot exist (bad characters) is a node that does not exist."""
    if not _is_node_id(value):
        raise NotFound(f"node {value[:80]!r} does not exist", field="node_id")
    return value


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
