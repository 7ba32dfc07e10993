"""StorageClass parameters: the only keys we accept, checked once.

A typo such as `vgp: fast` must not silently give the user the default
group, so every key that is neither ours nor in the `csi.storage.k8s.io/`
namespace (where the external-provisioner puts the PVC/PV names) is refused
with INVALID_ARGUMENT naming it and listing what is allowed. See
docs/storageclass.md.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from csi_driver.capabilities import DEFAULT_FS_TYPE, SUPPORTED_FS_TYPES
from tessera import ids
from tessera.errors import InvalidArgument
from tessera.models import Locality

VPG = "vpg"
FS_TYPE = "csi.storage.k8s.io/fstype"
MKFS_OPTIONS = "mkfsOptions"
LOCALITY = "locality"
ALLOWED = (VPG, FS_TYPE, MKFS_OPTIONS, LOCALITY)
#: reserved for the CSI sidecars (pvc/name, pvc/namespace, pv/name, secrets...)
SIDECAR_PREFIX = "csi.storage.k8s.io/"

DEFAULT_VPG = "default"
MAX_MKFS_OPTIONS = 1024

#: keys of Volume.volume_context (and of the parameters stored in management)
CONTEXT_FS_TYPE = "fsType"
CONTEXT_MKFS_OPTIONS = "mkfsOptions"
CONTEXT_LOCALITY = "locality"


@dataclass(frozen=True)
class StorageParameters:
    vpg: str = DEFAULT_VPG
    fs_type: str = DEFAULT_FS_TYPE
    #: whether the StorageClass named the filesystem (vs. our default)
    fs_type_given: bool = False
    mkfs_options: str = ""
    locality: Locality = Locality.ANY
    #: the sidecars' own keys (PVC/PV names), kept as volume metadata
    sidecar: tuple[tuple[str, str], ...] = ()

    def volume_context(self) -> dict[str, str]:
        """What the node needs to format the volume; immutable for the volume's life."""
        return {CONTEXT_FS_TYPE: self.fs_type, CONTEXT_MKFS_OPTIONS: self.mkfs_options}

    def stored(self) -> dict[str, str]:
        """Parameters kept with the volume in management."""
        out = dict(self.sidecar)
        out.update(self.volume_context())
        out[CONTEXT_LOCALITY] = self.locality.value
        return out


def parse_parameters(params: Mapping[str, str], field: str = "parameters") -> StorageParameters:
    """Validate StorageClass parameters; raise InvalidArgument naming the bad one."""
    unknown = sorted(k for k in params if k not in ALLOWED and not k.startswith(SIDECAR_PREFIX))
    if unknown:
        raise InvalidArgument(
            f"{field}: unknown parameter {unknown[0]!r}; allowed: {', '.join(ALLOWED)} "
            f"(and keys starting with {SIDECAR_PREFIX!r})",
            field=field,
        )
    vpg = params.get(VPG, "") or DEFAULT_VPG
    ids.check_name(vpg, f"{field}.{VPG}")

    fs_type = params.get(FS_TYPE, "")
    fs_type_given = bool(fs_type)
    if fs_type_given and fs_type not in SUPPORTED_FS_TYPES:
        raise InvalidArgument(
            f"{field}.{FS_TYPE} {fs_type[:40]!r} is not supported (use one of "
            f"{', '.join(SUPPORTED_FS_TYPES)})",
            field=field,
        )

    mkfs_options = params.get(MKFS_OPTIONS, "").strip()
    split_mkfs_options(mkfs_options, f"{field}.{MKFS_OPTIONS}")

    raw_locality = params.get(LOCALITY, "") or Locality.ANY.value
    try:
        locality = Locality(raw_locality)
    except ValueError:
        raise InvalidArgument(
            f"{field}.{LOCALITY} {raw_locality[:40]!r} is not one of "
            f"{', '.join(m.value for m in Locality)}",
            field=field,
        ) from None

    sidecar = tuple(
        sorted((k, v) for k, v in params.items() if k.startswith(SIDECAR_PREFIX) and k != FS_TYPE)
    )
    return StorageParameters(
        vpg=vpg,
        fs_type=fs_type or DEFAULT_FS_TYPE,
        fs_type_given=fs_type_given,
        mkfs_options=mkfs_options,
        locality=locality,
        sidecar=sidecar,
    )


def split_mkfs_options(text: str, field: str = MKFS_OPTIONS) -> list[str]:
    """mkfs gets these as separate argv entries (never a shell); device paths are refused."""
    if len(text) > MAX_MKFS_OPTIONS:
        raise InvalidArgument(f"{field} is longer than {MAX_MKFS_OPTIONS} characters", field=field)
    try:
        args = shlex.split(text)
    except ValueError as exc:
        raise InvalidArgument(f"{field} cannot be parsed: {exc}", field=field) from None
    for arg in args:
        if arg.startswith("/") or any(ord(c) < 0x20 for c in arg):
            raise InvalidArgument(
                f"{field}: {arg[:40]!r} is not allowed (device paths and control characters "
                "are refused; the plugin passes the device itself)",
                field=field,
            )
    return args
