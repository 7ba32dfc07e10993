"""The kernel's block I/O limits per cgroup and device (cgroup v1 blkio.throttle, v2 io.max).

A limit is a rule "device MAJ:MIN in cgroup C: at most N bytes/IOs per
second", enforced by the kernel at the device's queue for every process in
C (and below it). The node-agent writes one per device of a volume into the
cgroup of the pod that uses it (docs/data-services.md, QoS).

cgroup v1 throttles direct I/O and reads only: buffered writes reach the
device from the kernel's writeback threads, which v1 does not attribute to
the writer's cgroup. v2 attributes writeback too. v1 throttling is also not
hierarchical (a rule binds only the processes of its own cgroup), so on v1
a rule goes into every cgroup of the pod's subtree (`targets`).

Where the pods are: the kubelet makes `kubepods/<qos>/pod<uid>` (cgroupfs
driver) or `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice`
(systemd driver; the UID's dashes become underscores), `<qos>` being
`burstable` or `besteffort` (Guaranteed pods sit right under kubepods); on
v1 inside the blkio hierarchy.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from tessera.errors import FailedPrecondition, InvalidArgument

DEFAULT_CGROUP_ROOT = Path("/sys/fs/cgroup")
#: the consumer named when the pod is not known (CSIDriver without podInfoOnMount)
UNKNOWN_POD = "unknown-pod"
#: a pod UID as the kubelet names it (a UUID; some tests use shorter hex strings)
POD_UID_PATTERN = r"^[0-9a-fA-F][0-9a-fA-F-]{0,63}$"
_V1_FILES = {
    "rbps": "blkio.throttle.read_bps_device",
    "wbps": "blkio.throttle.write_bps_device",
    "riops": "blkio.throttle.read_iops_device",
    "wiops": "blkio.throttle.write_iops_device",
}
_QOS_CLASSES = ("", "burstable", "besteffort")


@dataclass(frozen=True)
class IoLimits:
    """Per device; 0 is unlimited."""

    rbps: int = 0
    wbps: int = 0
    riops: int = 0
    wiops: int = 0


@dataclass(frozen=True)
class Hierarchy:
    """Where cgroups with I/O limits live: the v1 blkio mount, or the v2 unified one."""

    root: Path
    version: int

    def contains(self, path: Path) -> bool:
        return path == self.root or self.root in path.parents


def hierarchy(cgroup_root: Path = DEFAULT_CGROUP_ROOT) -> Hierarchy | None:
    """The I/O hierarchy under `cgroup_root` (itself a v1 blkio cgroup in tests); None: none."""
    root = cgroup_root.resolve()
    for candidate in (root / "blkio", root):
        if (candidate / _V1_FILES["rbps"]).is_file():
            return Hierarchy(candidate, 1)
    if (root / "cgroup.controllers").is_file():
        return Hierarchy(root, 2)
    return None


def check_pod_uid(pod_uid: str) -> str:
    if not re.fullmatch(POD_UID_PATTERN, pod_uid):
        raise InvalidArgument(f"{pod_uid[:80]!r} is not a pod UID", field="pod_uid")
    return pod_uid


def pod_cgroup(h: Hierarchy, pod_uid: str) -> Path | None:
    """The pod's cgroup directory under either kubelet cgroup driver; None when absent."""
    uid = check_pod_uid(pod_uid)
    under = uid.replace("-", "_")
    for qos in _QOS_CLASSES:
        cgroupfs = h.root / "kubepods" / qos / f"pod{uid}"
        prefix = f"kubepods-{qos}" if qos else "kubepods"
        slice_dir = h.root / "kubepods.slice"
        if qos:
            slice_dir = slice_dir / f"{prefix}.slice"
        for path in (cgroupfs, slice_dir / f"{prefix}-pod{under}.slice"):
            if path.is_dir() and h.contains(path.resolve()):
                return path
    return None


def kubepods_cgroup(h: Hierarchy) -> Path | None:
    """The parent of every pod's cgroup (either driver); None when this is no kubelet node."""
    for name in ("kubepods", "kubepods.slice"):
        if (h.root / name).is_dir():
            return h.root / name
    return None


def targets(h: Hierarchy, cgroup: Path) -> list[Path]:
    """The cgroups a rule for `cgroup` must be written into to cover its processes.

    v2 limits are hierarchical: the cgroup itself covers everything below.
    v1 blkio throttling is not (a parent's rule never slows a child's
    processes), and a pod's processes live in its containers' cgroups
    below the pod's: so every cgroup in the subtree gets the rule.
    """
    if h.version == 2:
        return [cgroup]
    found = [cgroup]
    for top, dirs, _ in os.walk(cgroup):
        found += [Path(top) / d for d in sorted(dirs)]
    return found


def device_number(device: str) -> tuple[int, int]:
    """MAJ:MIN of a block device (a symlink to one is followed)."""
    st = os.stat(device)
    if not stat.S_ISBLK(st.st_mode):
        raise FailedPrecondition(f"{device} is not a block device", field="device")
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def set_limits(h: Hierarchy, cgroup: Path, device: tuple[int, int], limits: IoLimits) -> bool:
    """Make the device's rules in `cgroup` be `limits` (all zero: no rule); True if changed.

    A cgroup that went away meanwhile (a container that exited) is skipped; one that is
    there without the I/O controller's files (v2: `io` not in its parent's
    cgroup.subtree_control) is FailedPrecondition, so the volume's condition says
    its limits are not enforced instead of nothing saying so.
    """
    if not h.contains(cgroup.resolve()):
        raise InvalidArgument(f"{cgroup} is not under {h.root}", field="cgroup")
    try:
        if read_limits(h, cgroup, device) == limits:
            return False
    except FileNotFoundError:
        if not cgroup.is_dir():
            return False
        enable = "blkio controller" if h.version == 1 else "'io' in its parent's subtree_control"
        raise FailedPrecondition(
            f"cgroup {cgroup} has no I/O limit files (enable the {enable}): limits not enforced",
            field="cgroup",
        ) from None
    dev = f"{device[0]}:{device[1]}"
    if h.version == 1:
        for key, name in _V1_FILES.items():
            _write(cgroup / name, f"{dev} {getattr(limits, key)}")
        return True
    fields = " ".join(
        f"{key}={getattr(limits, key) or 'max'}" for key in ("rbps", "wbps", "riops", "wiops")
    )
    _write(cgroup / "io.max", f"{dev} {fields}")
    return True


def read_limits(h: Hierarchy, cgroup: Path, device: tuple[int, int]) -> IoLimits:
    """What the kernel enforces for the device in `cgroup` (for tests and diagnostics)."""
    dev = f"{device[0]}:{device[1]}"
    if h.version == 1:
        values = {}
        for key, name in _V1_FILES.items():
            rules = dict(line.split() for line in (cgroup / name).read_text().splitlines() if line)
            values[key] = int(rules.get(dev, 0))
        return IoLimits(**values)
    for line in (cgroup / "io.max").read_text().splitlines():
        head, _, rest = line.partition(" ")
        if head == dev:
            pairs = dict(item.split("=") for item in rest.split())
            return IoLimits(**{k: 0 if v == "max" else int(v) for k, v in pairs.items()})
    return IoLimits()


def _write(path: Path, line: str) -> None:
    """One rule per write(2): the kernel parses each write as one rule."""
    try:
        with open(path, "w") as f:
            f.write(line + "\n")
    except FileNotFoundError:
        return  # the cgroup went away (its processes exited): nothing left to limit
    except OSError as err:
        raise FailedPrecondition(
            f"the kernel refused the I/O limit {line!r} in {path}: {err.strerror}",
            field="cgroup",
        ) from err
