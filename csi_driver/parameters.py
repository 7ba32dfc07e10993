"""StorageClass parameters: the only keys we accept, checked once.

A typo such as `vgp: fast` must not silently give the user the default
group, so every key that is neither ours nor in the `csi.storage.k8s.io/`
namespace (where the external-provisioner puts the PVC/PV names) is refused
with INVALID_ARGUMENT naming it and listing what is allowed. See
docs/storageclass.md.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

from csi_driver.capabilities import DEFAULT_FS_TYPE, SUPPORTED_FS_TYPES
from tessera import ids
from tessera.errors import InvalidArgument
from tessera.models import MAX_BYTES, MAX_IOPS, Locality, QosLimits
from tessera.system.cgroups import POD_UID_PATTERN, UNKNOWN_POD

VPG = "vpg"
FS_TYPE = "csi.storage.k8s.io/fstype"
MKFS_OPTIONS = "mkfsOptions"
LOCALITY = "locality"
#: force how a volume's remote legs are reached (nbd or nvme-tcp), one leg or several;
#: docs/layouts.md, "Transports"
TRANSPORT = "transport"
TRANSPORTS = ("nbd", "nvme-tcp")
#: QoS (docs/data-services.md): also the only mutable parameters (ControllerModifyVolume);
#: each maps to its QosLimits field and largest value
QOS_KEYS = {
    "maxReadBytesPerSecond": ("max_read_bytes_per_second", MAX_BYTES),
    "maxWriteBytesPerSecond": ("max_write_bytes_per_second", MAX_BYTES),
    "maxReadIops": ("max_read_iops", MAX_IOPS),
    "maxWriteIops": ("max_write_iops", MAX_IOPS),
}
ALLOWED = (VPG, FS_TYPE, MKFS_OPTIONS, LOCALITY, TRANSPORT, *QOS_KEYS)
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
    #: "" (management chooses) or a forced remote transport, stored with the volume
    transport: str = ""
    #: the sidecars' own keys (PVC/PV names), kept as volume metadata
    sidecar: tuple[tuple[str, str], ...] = ()
    #: I/O limits; mutable later, so kept in VolumeCreate.qos, never in the stored parameters
    qos: QosLimits = field(default_factory=QosLimits)

    def volume_context(self) -> dict[str, str]:
        """What the node needs to format the volume; immutable for the volume's life."""
        return {CONTEXT_FS_TYPE: self.fs_type, CONTEXT_MKFS_OPTIONS: self.mkfs_options}

    def stored(self) -> dict[str, str]:
        """Parameters kept with the volume in management."""
        out = dict(self.sidecar)
        out.update(self.volume_context())
        out[CONTEXT_LOCALITY] = self.locality.value
        if self.transport:
            out[TRANSPORT] = self.transport  # management reads it at every publish
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

    transport = params.get(TRANSPORT, "")
    if transport and transport not in TRANSPORTS:
        raise InvalidArgument(
            f"{field}.{TRANSPORT} {transport[:40]!r} is not one of {', '.join(TRANSPORTS)}",
            field=field,
        )

    sidecar = tuple(
        sorted((k, v) for k, v in params.items() if k.startswith(SIDECAR_PREFIX) and k != FS_TYPE)
    )
    return StorageParameters(
        vpg=vpg,
        fs_type=fs_type or DEFAULT_FS_TYPE,
        fs_type_given=fs_type_given,
        mkfs_options=mkfs_options,
        locality=locality,
        transport=transport,
        sidecar=sidecar,
        qos=qos_limits(params, field),
    )


def qos_limits(
    params: Mapping[str, str], field: str = "parameters", base: QosLimits | None = None
) -> QosLimits:
    """The QoS keys present in `params`, over `base` (absent keys keep its values)."""
    values = (base or QosLimits()).model_dump()
    for key, (attr, top) in QOS_KEYS.items():
        if key in params:
            values[attr] = _count(params[key], f"{field}.{key}", top)
    return QosLimits(**values)


def parse_mutable_parameters(
    params: Mapping[str, str], base: QosLimits, field: str = "mutable_parameters"
) -> QosLimits:
    """ControllerModifyVolume / CreateVolume mutable_parameters: QoS keys only.

    Only the keys given change (the spec: "SPs MUST NOT modify volumes based
    on the absence of keys"); 0 lifts a limit.
    """
    unknown = sorted(k for k in params if k not in QOS_KEYS)
    if unknown:
        raise InvalidArgument(
            f"{field}: {unknown[0]!r} is not a mutable parameter; mutable: {', '.join(QOS_KEYS)}",
            field=field,
        )
    return qos_limits(params, field, base)


def _count(text: str, field: str, top: int) -> int:
    """A non-negative decimal integer, at most `top` (0: unlimited); nothing else."""
    if not (text.isascii() and text.isdigit()) or len(text) > 20:
        raise InvalidArgument(
            f"{field} {text[:40]!r} must be a non-negative whole number (0: unlimited)",
            field=field.partition(".")[0],
        )
    value = int(text)
    if value > top:
        raise InvalidArgument(
            f"{field} {value} is larger than {top}", field=field.partition(".")[0]
        )
    return value


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


#: volume_context key the kubelet fills when the CSIDriver has podInfoOnMount: true
POD_UID = "csi.storage.k8s.io/pod.uid"
#: the kubelet's publish paths: filesystem volumes
#: /var/lib/kubelet/pods/<pod uid>/volumes/kubernetes.io~csi/<pv>/mount, block volumes
#: /var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/<pv>/<pod uid>
_UID = r"([0-9a-fA-F][0-9a-fA-F-]{0,63})"
_KUBELET_TARGETS = (
    re.compile(rf"/pods/{_UID}/volumes/"),
    re.compile(rf"/volumeDevices/publish/[^/]+/{_UID}$"),
)


def consumer_pod(volume_context: Mapping[str, str], target_path: str) -> str:
    """The pod a publish is for, whose cgroup gets the volume's QoS limits.

    podInfoOnMount's `csi.storage.k8s.io/pod.uid` first; else the pod UID in
    the kubelet's target path (NodeUnpublishVolume has nothing else); else
    `unknown-pod` (node_agent/qos.py limits it in the kubepods cgroup).
    """
    uid = volume_context.get(POD_UID, "")
    for pattern in _KUBELET_TARGETS:
        found = None if uid else pattern.search(target_path.rstrip("/"))
        uid = found.group(1) if found else uid
    return uid if re.fullmatch(POD_UID_PATTERN, uid) else UNKNOWN_POD
