"""One validation order for every CSI RPC (docs/contracts.md, "Validation order").

Each RPC handler calls its validator here first and works only with the
frozen request object it gets back, so no handler can act on a field nobody
checked. Every validator runs the same three steps, and a step runs only
once the one before it passed:

1. presence: every REQUIRED field is set. All missing ones are named in one
   INVALID_ARGUMENT, whatever the other fields hold (a made-up volume ID
   does not turn a request without a target_path into NOT_FOUND).
2. form: IDs, names, paths, sizes, capabilities, parameters and every map
   (secrets included) are well-formed: INVALID_ARGUMENT naming the field.
3. existence, the part that needs no lookup: an ID that cannot be one of
   ours names nothing (NOT_FOUND, or OK where the spec says "gone is done"),
   and a stats/expand volume_path that is relative or missing names no
   volume (NOT_FOUND). The handler then does the real lookups.

Nothing here touches the network, and the only filesystem access is the
`os.path.exists` of step 3 on an already checked absolute path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from google.protobuf.message import Message

from csi_driver._gen import csi_pb2
from csi_driver.capabilities import Capability, parse_capability
from csi_driver.parameters import (
    SIDECAR_PREFIX,
    StorageParameters,
    parse_mutable_parameters,
    parse_parameters,
)
from csi_driver.publish_context import from_publish_context
from tessera import ids
from tessera.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange
from tessera.models import Connection, ContentSource, GiB, Locality, QosLimits
from tessera.topology import TOPOLOGY_KEY, candidate_nodes

#: CSI "Size Limits": strings 128 bytes, maps 4 KiB, unless a field says otherwise
MAX_STRING_BYTES = 128
MAX_MAP_BYTES = 4096
#: NodeGetInfoResponse.node_id overrides the string limit: at most 256 bytes
MAX_NODE_ID_BYTES = 256
#: MountVolume.mount_flags: "The total size of this repeated field SHALL NOT exceed 4 KiB"
MAX_MOUNT_FLAGS_BYTES = 4096
#: path fields override the string limit; Linux's own limits are the real ones
MAX_PATH_BYTES = 4095
MAX_PATH_COMPONENT_BYTES = 255
DEFAULT_SIZE = GiB

# U+0000-U+0008, U+000B, U+000C, U+000E-U+001F, U+007F-U+009F (CreateVolumeRequest.name)
_BANNED_NAME_CHARS = frozenset(
    [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0)]
)
#: Secrets Requirements: "Each key MUST consist of alphanumeric characters, '-', '_' or '.'"
_SECRET_KEY = re.compile(r"[A-Za-z0-9._-]+")


# ---- step 1: presence ----------------------------------------------------------------


def _present(request: Message, name: str) -> bool:
    value = getattr(request, name)
    if isinstance(value, Message):
        return request.HasField(name)
    if isinstance(value, str | bytes):
        return bool(value)
    if hasattr(value, "__len__"):  # repeated and map fields: at least one element
        return len(value) > 0
    return bool(value)


def require(request: Message, *names: str) -> None:
    """INVALID_ARGUMENT naming every REQUIRED field that is missing.

    A capability that is there must have its own REQUIRED parts (access_type,
    access_mode): those are missing fields too, whichever RPC carries them.
    """
    missing = [n for n in names if not _present(request, n)]
    if missing:
        raise InvalidArgument("; ".join(f"{n} is required" for n in missing), field=missing[0])
    fields = request.DESCRIPTOR.fields_by_name
    if "volume_capability" in fields and request.HasField("volume_capability"):
        capability_shape([request.volume_capability], "volume_capability")  # type: ignore[attr-defined]
    if "volume_capabilities" in fields:
        capability_shape(request.volume_capabilities, "volume_capabilities")  # type: ignore[attr-defined]


# ---- step 2: form ---------------------------------------------------------------------


def _bytes(value: str) -> int:
    return len(value.encode("utf-8", "surrogatepass"))


def id_form(value: str, field: str, limit: int = MAX_STRING_BYTES) -> str:
    """An ID longer than the spec allows is malformed; any other string may name something."""
    if _bytes(value) > limit:
        raise InvalidArgument(
            f"{field} is {_bytes(value)} bytes long; the CSI limit is {limit}", field=field
        )
    return value


def name_form(value: str, field: str = "name") -> str:
    if _bytes(value) > MAX_STRING_BYTES:
        raise InvalidArgument(
            f"{field} is {_bytes(value)} bytes long; at most {MAX_STRING_BYTES} are allowed",
            field=field,
        )
    if any(ord(c) in _BANNED_NAME_CHARS for c in value):
        raise InvalidArgument(f"{field} must not contain control characters", field=field)
    return value


def map_form(values: Mapping[str, str], field: str) -> dict[str, str]:
    size = sum(_bytes(k) + _bytes(v) for k, v in values.items())
    if size > MAX_MAP_BYTES:
        raise InvalidArgument(
            f"{field} holds {size} bytes; the CSI limit for a map is {MAX_MAP_BYTES}", field=field
        )
    return dict(values)


def secrets_form(values: Mapping[str, str], field: str = "secrets") -> None:
    """Checked like any map, and never quoted back: a key may be all a leaked value needs."""
    if sum(_bytes(k) + _bytes(v) for k, v in values.items()) > MAX_MAP_BYTES:
        raise InvalidArgument(f"{field} is larger than {MAX_MAP_BYTES} bytes", field=field)
    if any(not _SECRET_KEY.fullmatch(k) for k in values):
        raise InvalidArgument(
            f"{field}: every key must consist of letters, digits, '-', '_' or '.'", field=field
        )


def _path_text(value: str, field: str) -> None:
    """What no path may hold: NUL and control characters, `..`, names Linux cannot take."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise InvalidArgument(f"{field} must not contain control characters", field=field)
    if ".." in value.split("/"):
        raise InvalidArgument(f"{field} {value[:200]!r} must not contain '..'", field=field)
    if _bytes(value) > MAX_PATH_BYTES:
        raise InvalidArgument(
            f"{field} is {_bytes(value)} bytes long; Linux paths end at {MAX_PATH_BYTES}",
            field=field,
        )
    if any(_bytes(part) > MAX_PATH_COMPONENT_BYTES for part in value.split("/")):
        raise InvalidArgument(
            f"{field} has a component longer than {MAX_PATH_COMPONENT_BYTES} bytes", field=field
        )


def path_form(value: str, field: str) -> str:
    """A kubelet-given staging/target path: absolute, no '..', not '/'; returned normalized.

    Symlinks are resolved by the node handler's body, after this check.
    """
    _path_text(value, field)
    if not os.path.isabs(value):
        raise InvalidArgument(f"{field} {value[:200]!r} must be an absolute path", field=field)
    path = os.path.normpath(value)
    if path in ("/", "//"):
        raise InvalidArgument(f"{field} must not be the root directory", field=field)
    return path


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def publish_paths_apart(target: str, staging: str) -> None:
    """Neither publish path may be the other or lie under it (INVALID_ARGUMENT, target_path).

    A bind onto (or into) the staging mount hides it, and unpublishing that
    target unmounts the pod's volume (found by the CSI fuzzer); a staging
    mount under the target is covered by the bind. Checked on the paths as
    given, and by the node handler again once they are resolved.
    """
    if _within(target, staging):
        raise InvalidArgument(
            f"target_path {target} must not be staging_target_path {staging} or under it",
            field="target_path",
        )
    if _within(staging, target):
        raise InvalidArgument(
            f"target_path {target} must not contain staging_target_path {staging}",
            field="target_path",
        )


def capability_form(cap: csi_pb2.VolumeCapability, field: str) -> Capability:
    """Required sub-fields, then what this plugin can offer at all (INVALID_ARGUMENT)."""
    _shape(cap, field, field)
    if cap.HasField("mount"):
        _mount_form(cap.mount, field)
    return parse_capability(cap, field)


def _mount_form(mount: csi_pb2.VolumeCapability.MountVolume, field: str) -> None:
    flags = list(mount.mount_flags)
    if sum(_bytes(f) for f in flags) > MAX_MOUNT_FLAGS_BYTES:
        raise InvalidArgument(
            f"{field}.mount.mount_flags exceed {MAX_MOUNT_FLAGS_BYTES} bytes", field=field
        )
    if any(not f or any(ord(c) < 0x20 or ord(c) == 0x7F for c in f) for f in flags):
        raise InvalidArgument(
            f"{field}.mount.mount_flags: a flag is empty or holds control characters", field=field
        )
    if mount.volume_mount_group:
        # No VOLUME_MOUNT_GROUP node capability: ignoring it would hand the pod
        # a volume its group cannot write.
        raise InvalidArgument(
            f"{field}.mount.volume_mount_group is not supported (no VOLUME_MOUNT_GROUP)",
            field=field,
        )


def capabilities_form(
    caps: Sequence[csi_pb2.VolumeCapability], field: str = "volume_capabilities"
) -> tuple[Capability, ...]:
    return tuple(capability_form(c, f"{field}[{i}]") for i, c in enumerate(caps))


def capability_shape(caps: Sequence[csi_pb2.VolumeCapability], field: str) -> None:
    """Only the REQUIRED sub-fields: where an unsupported capability is an answer, not an error."""
    for i, cap in enumerate(caps):
        _shape(cap, f"{field}[{i}]", field)


def _shape(cap: csi_pb2.VolumeCapability, name: str, field: str) -> None:
    """access_type and access_mode are set; `name` is how the message spells the capability."""
    if cap.WhichOneof("access_type") is None:
        raise InvalidArgument(f"{name}.access_type: set either block or mount", field=field)
    if cap.access_mode.mode == _Mode.UNKNOWN:
        raise InvalidArgument(f"{name}.access_mode: an access mode is required", field=field)


def capacity_form(
    cr: csi_pb2.CapacityRange | None, field: str = "capacity_range", *, default: int = 0
) -> tuple[int, int]:
    """(size to ask for, limit or 0). Unset -> (default, 0).

    A negative value, both zero, or limit < required is malformed
    (INVALID_ARGUMENT); a well-formed range we cannot serve is the
    owner's OUT_OF_RANGE.
    """
    if cr is None:
        return default, 0
    want, limit = cr.required_bytes, cr.limit_bytes
    if want < 0:
        raise InvalidArgument(f"{field}.required_bytes must not be negative ({want})", field=field)
    if limit < 0:
        raise InvalidArgument(f"{field}.limit_bytes must not be negative ({limit})", field=field)
    if want == 0 and limit == 0:
        raise InvalidArgument(f"{field}: set required_bytes, limit_bytes or both", field=field)
    if limit and want > limit:
        raise InvalidArgument(
            f"{field}.limit_bytes ({limit}) is smaller than required_bytes ({want})", field=field
        )
    if want:
        return want, limit
    return (min(default, limit) if default else limit), limit


def topology_form(topologies: Sequence[csi_pb2.Topology], field: str) -> tuple[str, ...]:
    """Node ids named by topology segments, in order, without duplicates."""
    out: list[str] = []
    for topo in topologies:
        map_form(topo.segments, field)
        node = topo.segments.get(TOPOLOGY_KEY, "")
        if node and node not in out:
            out.append(ids.check_node_id(node, f"{field} segment {TOPOLOGY_KEY}"))
    return tuple(out)


# ---- step 3: existence without a lookup ---------------------------------------------------


def known_volume(volume_id: str, field: str = "volume_id") -> str:
    """An ID that is not vol-<hex> names no volume of ours."""
    if not ids.is_volume_id(volume_id):
        raise NotFound(
            f"{field} {volume_id[:80]!r} is not a Tessera volume ID (expected vol-<hex>)",
            field=field,
        )
    return volume_id


def known_snapshot(snapshot_id: str, field: str = "snapshot_id") -> str:
    """An ID that is not snap-<hex> names no snapshot of ours."""
    if not ids.is_snapshot_id(snapshot_id):
        raise NotFound(
            f"{field} {snapshot_id[:80]!r} is not a Tessera snapshot ID (expected snap-<hex>)",
            field=field,
        )
    return snapshot_id


def is_node_id(value: str) -> bool:
    try:
        ids.check_node_id(value)
    except InvalidArgument:
        return False
    return True


def known_node(node_id: str, field: str = "node_id") -> str:
    if not is_node_id(node_id):
        raise NotFound(f"node {node_id[:80]!r} does not exist", field=field)
    return node_id


def existing_volume_path(value: str, field: str = "volume_path") -> str:
    """Stats/expand: a relative or missing volume_path is where no volume is (NOT_FOUND)."""
    if not os.path.isabs(value):
        raise NotFound(f"{field} {value[:200]!r} is not an absolute path to a volume", field=field)
    path = path_form(value, field)
    if not os.path.exists(path):
        raise NotFound(f"{field} {path} does not exist", field=field)
    return path


_Mode = csi_pb2.VolumeCapability.AccessMode.Mode


# ---- the request objects, one per RPC -------------------------------------------------------


@dataclass(frozen=True)
class CreateVolume:
    name: str
    capabilities: tuple[Capability, ...]
    size: int
    limit: int
    params: StorageParameters
    requisite: tuple[str, ...]
    preferred: tuple[str, ...]
    #: the snapshot or volume to clone, or None for an empty volume
    source: ContentSource | None = None
    #: whether the CO gave a capacity_range (a clone without one is the source's size)
    sized: bool = True


@dataclass(frozen=True)
class VolumeGone:
    """DeleteVolume / ControllerUnpublishVolume: `ours` False means nothing to do (OK)."""

    volume_id: str
    node_id: str
    ours: bool


@dataclass(frozen=True)
class ControllerPublish:
    volume_id: str
    node_id: str
    capability: Capability
    readonly: bool


@dataclass(frozen=True)
class ValidateCapabilities:
    volume_id: str


@dataclass(frozen=True)
class ListVolumes:
    max_entries: int
    starting_token: str


@dataclass(frozen=True)
class GetCapacity:
    nodes: tuple[str, ...]
    #: why no volume with these capabilities can be made ("" if it can)
    unsupported: str
    params: StorageParameters


@dataclass(frozen=True)
class VolumeRef:
    volume_id: str


@dataclass(frozen=True)
class ControllerModify:
    volume_id: str
    #: checked (QoS keys, whole numbers); merged over the volume's limits by the handler
    mutable_parameters: dict[str, str]


@dataclass(frozen=True)
class ControllerExpand:
    volume_id: str
    size: int
    limit: int
    capability: Capability | None


@dataclass(frozen=True)
class NodeStage:
    volume_id: str
    staging_target_path: str
    capability: Capability
    connection: Connection
    #: the attachment is read-only (publish_context readonly, or a read-only access mode)
    readonly: bool


@dataclass(frozen=True)
class NodeUnstage:
    volume_id: str
    staging_target_path: str


@dataclass(frozen=True)
class NodePublish:
    volume_id: str
    staging_target_path: str
    target_path: str
    capability: Capability
    readonly: bool


@dataclass(frozen=True)
class NodeUnpublish:
    volume_id: str
    target_path: str


@dataclass(frozen=True)
class NodeVolumePath:
    """NodeGetVolumeStats and NodeExpandVolume."""

    volume_id: str
    volume_path: str
    staging_target_path: str
    capability: Capability | None
    size: int
    limit: int


# ---- controller -----------------------------------------------------------------------------


def create_volume(r: csi_pb2.CreateVolumeRequest) -> CreateVolume:
    require(r, "name", "volume_capabilities")
    name = name_form(r.name)
    caps = capabilities_form(r.volume_capabilities)
    size, limit = capacity_form(
        r.capacity_range if r.HasField("capacity_range") else None, default=DEFAULT_SIZE
    )
    params = parse_parameters(map_form(r.parameters, "parameters"))
    params = _resolve_fs_type(params, r.volume_capabilities)
    # MODIFY_VOLUME: mutable_parameters (QoS keys only) take precedence over parameters
    mutable = map_form(r.mutable_parameters, "mutable_parameters")
    params = replace(params, qos=parse_mutable_parameters(mutable, params.qos))
    secrets_form(r.secrets)
    source = content_source_form(r) if r.HasField("volume_content_source") else None
    requisite, preferred = _placement(r.accessibility_requirements, params.locality)
    sized = r.HasField("capacity_range")
    return CreateVolume(name, caps, size, limit, params, requisite, preferred, source, sized)


def content_source_form(r: csi_pb2.CreateVolumeRequest) -> ContentSource:
    """The snapshot or volume to start from; an ID that cannot be ours names nothing (NOT_FOUND).

    csi-sanity creates from "non-existing-snapshot-id" and expects NOT_FOUND, and the
    spec's CreateVolume table lists "Source does not exist" as NOT_FOUND, so a foreign
    ID is a missing source, not a malformed request; an empty one is malformed.
    """
    fld = "volume_content_source"
    src = r.volume_content_source
    kind = src.WhichOneof("type")
    if kind is None:
        raise InvalidArgument(f"{fld}: set either snapshot or volume", field=fld)
    if kind == "snapshot":
        sid = id_form(src.snapshot.snapshot_id, f"{fld}.snapshot.snapshot_id")
        if not sid:
            raise InvalidArgument(f"{fld}.snapshot.snapshot_id is required", field=fld)
        return ContentSource(snapshot_id=known_snapshot(sid, f"{fld}.snapshot.snapshot_id"))
    vid = id_form(src.volume.volume_id, f"{fld}.volume.volume_id")
    if not vid:
        raise InvalidArgument(f"{fld}.volume.volume_id is required", field=fld)
    return ContentSource(volume_id=known_volume(vid, f"{fld}.volume.volume_id"))


def _placement(
    req: csi_pb2.TopologyRequirement, locality: Locality
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(requisite, preferred) nodes; locality=required narrows requisite to the consumer."""
    requisite = topology_form(req.requisite, "accessibility_requirements.requisite")
    preferred = topology_form(req.preferred, "accessibility_requirements.preferred")
    fields = ("accessibility_requirements.requisite", "accessibility_requirements.preferred")
    nodes = candidate_nodes(locality, requisite, preferred, fields)
    return tuple(nodes or ()), preferred


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
    return replace(params, fs_type=asked[0], fs_type_given=True)


def delete_volume(r: csi_pb2.DeleteVolumeRequest) -> VolumeGone:
    require(r, "volume_id")
    volume_id = id_form(r.volume_id, "volume_id")
    secrets_form(r.secrets)
    return VolumeGone(volume_id, "", ids.is_volume_id(volume_id))


def controller_publish(r: csi_pb2.ControllerPublishVolumeRequest) -> ControllerPublish:
    require(r, "volume_id", "node_id", "volume_capability")
    volume_id = id_form(r.volume_id, "volume_id")
    node_id = id_form(r.node_id, "node_id", MAX_NODE_ID_BYTES)
    cap = capability_form(r.volume_capability, "volume_capability")
    secrets_form(r.secrets)
    map_form(r.volume_context, "volume_context")
    known_volume(volume_id)
    known_node(node_id)
    # a reader-only mode is read-only whatever the flag says (PUBLISH_READONLY)
    return ControllerPublish(volume_id, node_id, cap, r.readonly or cap.read_only_mode)


def controller_unpublish(r: csi_pb2.ControllerUnpublishVolumeRequest) -> VolumeGone:
    require(r, "volume_id")
    volume_id = id_form(r.volume_id, "volume_id")
    node_id = id_form(r.node_id, "node_id", MAX_NODE_ID_BYTES)
    secrets_form(r.secrets)
    # a volume or node that cannot exist is published nowhere: OK by the spec
    ours = ids.is_volume_id(volume_id) and (not node_id or is_node_id(node_id))
    return VolumeGone(volume_id, node_id, ours)


def validate_volume_capabilities(
    r: csi_pb2.ValidateVolumeCapabilitiesRequest,
) -> ValidateCapabilities:
    """Unsupported capabilities or parameters are the answer (`message`), not an error."""
    require(r, "volume_id", "volume_capabilities")
    volume_id = id_form(r.volume_id, "volume_id")
    map_form(r.volume_context, "volume_context")
    map_form(r.parameters, "parameters")
    map_form(r.mutable_parameters, "mutable_parameters")
    secrets_form(r.secrets)
    return ValidateCapabilities(known_volume(volume_id))


def list_volumes(r: csi_pb2.ListVolumesRequest) -> ListVolumes:
    if r.max_entries < 0:
        raise InvalidArgument(
            f"max_entries must not be negative ({r.max_entries})", field="max_entries"
        )
    return ListVolumes(r.max_entries, r.starting_token)


def get_capacity(r: csi_pb2.GetCapacityRequest) -> GetCapacity:
    require(r)
    unsupported = ""
    try:
        capabilities_form(r.volume_capabilities)
    except InvalidArgument as err:
        unsupported = err.message
    params = parse_parameters(map_form(r.parameters, "parameters"))
    nodes = topology_form([r.accessible_topology], "accessible_topology")
    return GetCapacity(nodes, unsupported, params)


def controller_get_volume(r: csi_pb2.ControllerGetVolumeRequest) -> VolumeRef:
    require(r, "volume_id")
    return VolumeRef(known_volume(id_form(r.volume_id, "volume_id")))


def controller_expand_volume(r: csi_pb2.ControllerExpandVolumeRequest) -> ControllerExpand:
    require(r, "volume_id", "capacity_range")
    volume_id = id_form(r.volume_id, "volume_id")
    size, limit = capacity_form(r.capacity_range)
    cap = None
    if r.HasField("volume_capability"):
        cap = capability_form(r.volume_capability, "volume_capability")
    secrets_form(r.secrets)
    return ControllerExpand(known_volume(volume_id), size, limit, cap)


def controller_modify_volume(r: csi_pb2.ControllerModifyVolumeRequest) -> ControllerModify:
    """Only keys present are modified (the spec), so mutable_parameters is REQUIRED."""
    require(r, "volume_id", "mutable_parameters")
    volume_id = id_form(r.volume_id, "volume_id")
    mutable = map_form(r.mutable_parameters, "mutable_parameters")
    parse_mutable_parameters(mutable, QosLimits())
    secrets_form(r.secrets)
    return ControllerModify(known_volume(volume_id), mutable)


# ---- node ------------------------------------------------------------------------------------


def node_stage_volume(r: csi_pb2.NodeStageVolumeRequest) -> NodeStage:
    require(r, "volume_id", "staging_target_path", "volume_capability")
    volume_id = id_form(r.volume_id, "volume_id")
    staging = path_form(r.staging_target_path, "staging_target_path")
    cap = capability_form(r.volume_capability, "volume_capability")
    map_form(r.publish_context, "publish_context")
    connection, readonly = from_publish_context(r.publish_context)
    map_form(r.volume_context, "volume_context")
    secrets_form(r.secrets)
    readonly = readonly or cap.read_only_mode
    return NodeStage(known_volume(volume_id), staging, cap, connection, readonly)


def node_unstage_volume(r: csi_pb2.NodeUnstageVolumeRequest) -> NodeUnstage:
    require(r, "volume_id", "staging_target_path")
    volume_id = id_form(r.volume_id, "volume_id")
    staging = path_form(r.staging_target_path, "staging_target_path")
    return NodeUnstage(known_volume(volume_id), staging)


def node_publish_volume(r: csi_pb2.NodePublishVolumeRequest) -> NodePublish:
    require(r, "volume_id", "target_path", "volume_capability")
    volume_id = id_form(r.volume_id, "volume_id")
    staging = ""
    if r.staging_target_path:
        staging = path_form(r.staging_target_path, "staging_target_path")
    target = path_form(r.target_path, "target_path")
    if staging:
        publish_paths_apart(target, staging)
    cap = capability_form(r.volume_capability, "volume_capability")
    map_form(r.publish_context, "publish_context")
    map_form(r.volume_context, "volume_context")
    secrets_form(r.secrets)
    if not staging:
        # OPTIONAL in the message, but the spec's own code when a staging
        # plugin gets none: "Staging target path not set"
        raise FailedPrecondition(
            "staging_target_path is required: this plugin stages volumes (STAGE_UNSTAGE_VOLUME)",
            field="staging_target_path",
        )
    readonly = r.readonly or cap.read_only_mode
    return NodePublish(known_volume(volume_id), staging, target, cap, readonly)


def node_unpublish_volume(r: csi_pb2.NodeUnpublishVolumeRequest) -> NodeUnpublish:
    require(r, "volume_id", "target_path")
    volume_id = id_form(r.volume_id, "volume_id")
    target = path_form(r.target_path, "target_path")
    return NodeUnpublish(known_volume(volume_id), target)


def _volume_path_request(
    r: csi_pb2.NodeGetVolumeStatsRequest | csi_pb2.NodeExpandVolumeRequest,
    cap: Capability | None,
    size: int,
    limit: int,
) -> NodeVolumePath:
    volume_id = id_form(r.volume_id, "volume_id")
    _path_text(r.volume_path, "volume_path")
    staging = ""
    if r.staging_target_path:
        staging = path_form(r.staging_target_path, "staging_target_path")
    known_volume(volume_id)
    path = existing_volume_path(r.volume_path)
    return NodeVolumePath(volume_id, path, staging, cap, size, limit)


def node_get_volume_stats(r: csi_pb2.NodeGetVolumeStatsRequest) -> NodeVolumePath:
    require(r, "volume_id", "volume_path")
    return _volume_path_request(r, None, 0, 0)


def node_expand_volume(r: csi_pb2.NodeExpandVolumeRequest) -> NodeVolumePath:
    require(r, "volume_id", "volume_path")
    size, limit = capacity_form(r.capacity_range if r.HasField("capacity_range") else None)
    cap = None
    if r.HasField("volume_capability"):
        cap = capability_form(r.volume_capability, "volume_capability")
    secrets_form(r.secrets)
    return _volume_path_request(r, cap, size, limit)


# ---- snapshots ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateSnapshot:
    name: str
    source_volume_id: str
    #: only the sidecars' csi.storage.k8s.io/ keys (VolumeSnapshot names), kept as metadata
    parameters: dict[str, str]


@dataclass(frozen=True)
class SnapshotRef:
    """DeleteSnapshot / GetSnapshot: `ours` False means the ID cannot name a snapshot of ours."""

    snapshot_id: str
    ours: bool


@dataclass(frozen=True)
class ListSnapshots:
    max_entries: int
    starting_token: str
    snapshot_id: str
    source_volume_id: str
    #: a filter names an ID that cannot be ours: the answer is an empty list, not an error
    names_nothing: bool


def snapshot_parameters(values: Mapping[str, str], field: str = "parameters") -> dict[str, str]:
    """VolumeSnapshotClass parameters: none of our own yet, so only the sidecars' keys.

    A typo'd key must not be silently ignored (the same rule as StorageClass
    parameters); the external-snapshotter's --extra-create-metadata keys
    (csi.storage.k8s.io/volumesnapshot/name, ...) are kept with the snapshot.
    """
    params = map_form(values, field)
    unknown = sorted(k for k in params if not k.startswith(SIDECAR_PREFIX))
    if unknown:
        raise InvalidArgument(
            f"{field}: unknown parameter {unknown[0][:60]!r}; snapshots take no parameters "
            f"of their own (only keys starting with {SIDECAR_PREFIX!r})",
            field=field,
        )
    return params


def create_snapshot(r: csi_pb2.CreateSnapshotRequest) -> CreateSnapshot:
    require(r, "name", "source_volume_id")
    name = name_form(r.name)
    source = id_form(r.source_volume_id, "source_volume_id")
    params = snapshot_parameters(r.parameters)
    secrets_form(r.secrets)
    return CreateSnapshot(name, known_volume(source, "source_volume_id"), params)


def delete_snapshot(r: csi_pb2.DeleteSnapshotRequest) -> SnapshotRef:
    require(r, "snapshot_id")
    snapshot_id = id_form(r.snapshot_id, "snapshot_id")
    secrets_form(r.secrets)
    return SnapshotRef(snapshot_id, ids.is_snapshot_id(snapshot_id))


def get_snapshot(r: csi_pb2.GetSnapshotRequest) -> SnapshotRef:
    require(r, "snapshot_id")
    snapshot_id = id_form(r.snapshot_id, "snapshot_id")
    secrets_form(r.secrets)
    return SnapshotRef(known_snapshot(snapshot_id), True)


def list_snapshots(r: csi_pb2.ListSnapshotsRequest) -> ListSnapshots:
    if r.max_entries < 0:
        raise InvalidArgument(
            f"max_entries must not be negative ({r.max_entries})", field="max_entries"
        )
    snapshot_id = id_form(r.snapshot_id, "snapshot_id")
    source = id_form(r.source_volume_id, "source_volume_id")
    secrets_form(r.secrets)
    nothing = bool(
        (snapshot_id and not ids.is_snapshot_id(snapshot_id))
        or (source and not ids.is_volume_id(source))
    )
    return ListSnapshots(r.max_entries, r.starting_token, snapshot_id, source, nothing)


# ---- group snapshots ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateGroupSnapshot:
    name: str
    source_volume_ids: tuple[str, ...]
    parameters: dict[str, str]


@dataclass(frozen=True)
class GroupSnapshotRef:
    """Get/DeleteVolumeGroupSnapshot. `ours` False: the ID cannot name a group of ours."""

    group_snapshot_id: str
    snapshot_ids: tuple[str, ...]
    ours: bool


def create_group_snapshot(r: csi_pb2.CreateVolumeGroupSnapshotRequest) -> CreateGroupSnapshot:
    require(r, "name", "source_volume_ids")
    name = name_form(r.name)
    sources: list[str] = []
    for i, vid in enumerate(r.source_volume_ids):
        fld = f"source_volume_ids[{i}]"
        if not vid:
            raise InvalidArgument(f"{fld} is empty", field="source_volume_ids")
        id_form(vid, fld)
        if vid in sources:
            raise InvalidArgument(f"{fld} {vid!r} is named twice", field="source_volume_ids")
        sources.append(vid)
    params = snapshot_parameters(r.parameters)
    secrets_form(r.secrets)
    for i, vid in enumerate(sources):
        known_volume(vid, f"source_volume_ids[{i}]")
    return CreateGroupSnapshot(name, tuple(sources), params)


def group_snapshot_ref(
    r: csi_pb2.GetVolumeGroupSnapshotRequest | csi_pb2.DeleteVolumeGroupSnapshotRequest,
) -> GroupSnapshotRef:
    """group_snapshot_id is checked first; snapshot_ids only against a group that exists.

    The spec marks snapshot_ids REQUIRED, but csi-sanity sends a made-up
    group_snapshot_id without any and expects NOT_FOUND (Get) and OK
    (Delete): a group that does not exist is answered before its member
    list is looked at. The handler refuses an empty or different list for a
    group that exists (INVALID_ARGUMENT, "Snapshot list mismatch").
    """
    require(r, "group_snapshot_id")
    gid = id_form(r.group_snapshot_id, "group_snapshot_id")
    for i, sid in enumerate(r.snapshot_ids):
        id_form(sid, f"snapshot_ids[{i}]")
    secrets_form(r.secrets)
    return GroupSnapshotRef(gid, tuple(r.snapshot_ids), ids.is_group_snapshot_id(gid))


# ---- snapshot metadata --------------------------------------------------------------------------


@dataclass(frozen=True)
class MetadataRequest:
    """GetMetadataAllocated (base_snapshot_id "") and GetMetadataDelta."""

    base_snapshot_id: str
    snapshot_id: str
    starting_offset: int
    max_results: int


def _metadata_numbers(starting_offset: int, max_results: int) -> None:
    if starting_offset < 0:
        # the spec's table: "The starting offset is negative or exceeds the volume size"
        raise OutOfRange(
            f"starting_offset must not be negative ({starting_offset})", field="starting_offset"
        )
    if max_results < 0:
        raise InvalidArgument(
            f"max_results must not be negative ({max_results})", field="max_results"
        )


def get_metadata_allocated(r: csi_pb2.GetMetadataAllocatedRequest) -> MetadataRequest:
    require(r, "snapshot_id")
    snapshot_id = id_form(r.snapshot_id, "snapshot_id")
    secrets_form(r.secrets)
    _metadata_numbers(r.starting_offset, r.max_results)
    return MetadataRequest("", known_snapshot(snapshot_id), r.starting_offset, r.max_results)


def get_metadata_delta(r: csi_pb2.GetMetadataDeltaRequest) -> MetadataRequest:
    require(r, "base_snapshot_id", "target_snapshot_id")
    base = id_form(r.base_snapshot_id, "base_snapshot_id")
    target = id_form(r.target_snapshot_id, "target_snapshot_id")
    secrets_form(r.secrets)
    _metadata_numbers(r.starting_offset, r.max_results)
    known_snapshot(base, "base_snapshot_id")
    known_snapshot(target, "target_snapshot_id")
    return MetadataRequest(base, target, r.starting_offset, r.max_results)
