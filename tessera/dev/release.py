"""Release every volume of a development pool: unmount, then detach.

Used when `dev up` stops, so the machine is left as it was found. A real
node keeps its volumes attached across agent restarts; only tearing the
whole dev stack down releases them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from csi_driver.mounts import mount_table, unmount, uses_device
from node_agent import loopdev
from tessera.dev.pool import loop_devices_backed_by
from tessera.errors import TesseraError

DEV_DIR = Path("/dev/tessera")


def mounts_of_devices(devices: list[str]) -> list[str]:
    """Mountpoints using any of these block devices, in mount order."""
    return [m.mountpoint for m in mount_table() if any(uses_device(m, d) for d in devices)]


def mounts_under(prefix: Path) -> list[str]:
    """Mountpoints at or below prefix (what a test or `dev up` must not leak)."""
    root = str(prefix.resolve())
    return [
        m.mountpoint
        for m in mount_table()
        if m.mountpoint == root or m.mountpoint.startswith(root + os.sep)
    ]


def release_volumes(pool_dir: Path) -> None:
    """Best effort: what cannot be released (a busy mount) is left for the caller to report."""
    volumes_dir = pool_dir / "volumes"
    loops = loop_devices_backed_by(volumes_dir) if volumes_dir.exists() else []
    devices = [dev for dev, _ in loops]
    for mountpoint in reversed(mounts_of_devices(devices)):
        with contextlib.suppress(TesseraError):
            unmount(mountpoint)
    for dev, backing in loops:
        link = DEV_DIR / Path(backing).stem
        if link.is_symlink() and os.path.realpath(link) == dev:
            link.unlink()
        with contextlib.suppress(OSError):
            loopdev.detach(dev)
