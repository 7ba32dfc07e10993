"""Release every volume of a development pool: unmount, then detach.

Used when `dev up` stops, so the machine is left as it was found. A real
node keeps its volumes attached across agent restarts; only tearing the
whole dev stack down releases them.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tessera.dev.pool import loop_devices_backed_by

TIMEOUT = 30
DEV_DIR = Path("/dev/tessera")


def _mountinfo() -> list[tuple[str, str, str, str]]:
    """(major:minor, root, mountpoint, fstype) per mount, in mount order."""
    rows = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts = left.split()
            fstype = right.split()[0] if right else ""
            rows.append((parts[2], _unescape(parts[3]), _unescape(parts[4]), fstype))
    return rows


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def _dev_number(device: str) -> str:
    st = os.stat(device)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def mounts_of_devices(devices: list[str]) -> list[str]:
    """Mountpoints using any of these block devices, innermost last.

    A filesystem mount shows the device's own major:minor; a block bind
    mount of the device node shows devtmpfs with the node's name as root.
    """
    numbers = {_dev_number(d) for d in devices if os.path.exists(d)}
    names = {"/" + os.path.basename(d) for d in devices}
    return [
        mountpoint
        for number, root, mountpoint, fstype in _mountinfo()
        if number in numbers or (fstype == "devtmpfs" and root in names)
    ]


def mounts_under(prefix: Path) -> list[str]:
    """Mountpoints at or below prefix (what a test or `dev up` must not leak)."""
    root = str(prefix.resolve())
    return [mp for _, _, mp, _ in _mountinfo() if mp == root or mp.startswith(root + os.sep)]


def release_volumes(pool_dir: Path, state_dir: Path) -> None:
    volumes_dir = pool_dir / "volumes"
    loops = loop_devices_backed_by(volumes_dir) if volumes_dir.exists() else []
    devices = [dev for dev, _ in loops]
    for mountpoint in reversed(mounts_of_devices(devices)):
        subprocess.run(["umount", mountpoint], capture_output=True, timeout=TIMEOUT, check=False)
    for dev, backing in loops:
        link = DEV_DIR / Path(backing).stem
        if link.is_symlink() and os.path.realpath(link) == dev:
            link.unlink()
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=TIMEOUT, check=False)
