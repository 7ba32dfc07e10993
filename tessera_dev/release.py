"""Release every volume of a development pool: unmount, then detach.

Used when `dev up` stops, so the machine is left as it was found. A real
node keeps its volumes attached across agent restarts; only tearing the
whole dev stack down releases them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from tessera.errors import TesseraError
from tessera.system import loopdev
from tessera.system.mounts import mounts_of_devices, unmount

DEV_DIR = Path("/dev/tessera")


def release_volumes(pool_dir: Path) -> None:
    """Best effort: what cannot be released (a busy mount) is left for the caller to report."""
    volumes_dir = pool_dir / "volumes"
    loops = loopdev.bound_under(volumes_dir) if volumes_dir.exists() else []
    devices = [bound.path for bound in loops]
    for mountpoint in reversed(mounts_of_devices(devices)):
        with contextlib.suppress(TesseraError):
            unmount(mountpoint)
    for bound in loops:
        link = DEV_DIR / Path(bound.backing).stem
        if link.is_symlink() and os.path.realpath(link) == bound.path:
            link.unlink()
        with contextlib.suppress(OSError):
            loopdev.detach(bound.path)
