"""Reading and checking CSI volume capabilities.

Both the controller and the node service receive `VolumeCapability`
messages; this module turns one into a plain `Capability` once, with the
checks the spec and ARCHITECTURE.md's access-mode table ask for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from csi_driver._gen import csi_pb2
from tessera.access_modes import READ_ONLY_MODES, filesystem_refusal
from tessera.errors import InvalidArgument
from tessera.models import AccessMode, AccessType

SUPPORTED_FS_TYPES = ("ext4", "xfs")
DEFAULT_FS_TYPE = "ext4"

_Mode = csi_pb2.VolumeCapability.AccessMode.Mode


@dataclass(frozen=True)
class Capability:
    access_type: AccessType
    access_mode: AccessMode
    fs_type: str = ""
    mount_flags: tuple[str, ...] = field(default=())

    @property
    def read_only_mode(self) -> bool:
        return self.access_mode in READ_ONLY_MODES


def parse_capability(cap: csi_pb2.VolumeCapability, fld: str = "volume_capability") -> Capability:
    """Validate one capability; raise InvalidArgument naming the field."""
    kind = cap.WhichOneof("access_type")
    if kind is None:
        raise InvalidArgument(f"{fld}.access_type: set either block or mount", field=fld)
    if not cap.HasField("access_mode") or cap.access_mode.mode == _Mode.UNKNOWN:
        raise InvalidArgument(f"{fld}.access_mode: an access mode is required", field=fld)
    if cap.access_mode.mode not in _Mode.values():
        # proto3 enums are open: a newer CO may send a mode this plugin never heard of
        raise InvalidArgument(
            f"{fld}.access_mode {cap.access_mode.mode} is not a CSI access mode this plugin knows",
            field=fld,
        )
    mode = AccessMode(_Mode.Name(cap.access_mode.mode))
    if kind == "block":
        return Capability(AccessType.BLOCK, mode)
    fs_type = cap.mount.fs_type or DEFAULT_FS_TYPE
    if fs_type not in SUPPORTED_FS_TYPES:
        raise InvalidArgument(
            f"{fld}.mount.fs_type {fs_type[:40]!r} is not supported (use one of "
            f"{', '.join(SUPPORTED_FS_TYPES)})",
            field=fld,
        )
    refusal = filesystem_refusal(mode)
    if refusal is not None:
        raise InvalidArgument(
            f"{fld}: {mode.value} is only offered for block volumes: {refusal}",
            field=fld,
        )
    return Capability(AccessType.MOUNT, mode, fs_type, tuple(cap.mount.mount_flags))


def parse_capabilities(
    caps: Sequence[csi_pb2.VolumeCapability], fld: str = "volume_capabilities"
) -> list[Capability]:
    if not caps:
        raise InvalidArgument(f"{fld} is required: give at least one capability", field=fld)
    return [parse_capability(c, f"{fld}[{i}]") for i, c in enumerate(caps)]
