"""A file-backed development pool: a sparse image, XFS with reflink, loop-mounted.

Production pools are directories on a filesystem on a local NVMe drive;
here the drive is an image file, so the rest of the stack cannot tell the
difference. The image is formatted only when it is blank: a restart of
`dev up` on the same state directory keeps every volume.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tessera.errors import TesseraError
from tessera.system import filesystems, loopdev, mounts


class PoolError(RuntimeError):
    pass


def is_mounted(path: Path) -> bool:
    return os.path.ismount(path)


def ensure_pool(image: Path, mountpoint: Path, size_bytes: int) -> str:
    """Create (if new), attach and mount the pool image; return its loop device.

    The image is attached with direct I/O, as the agent attaches volumes:
    the pool filesystem's writes and flushes then go straight to the image
    instead of through a second page cache.
    """
    if not image.exists():
        with open(image, "xb") as f:
            f.truncate(size_bytes)
    attached = [b.path for b in loopdev.bound_under(image) if b.backing == str(image.resolve())]
    try:
        if attached:
            device = attached[0]
        else:
            device, _ = loopdev.attach(str(image), readonly=False, direct_io=True)
        fs = filesystems.probe_filesystem(device)
    except (OSError, TesseraError) as exc:
        raise PoolError(f"cannot attach and probe {image}: {exc}") from exc
    if fs is None:
        res = subprocess.run(
            ["mkfs.xfs", "-q", "-K", "-m", "reflink=1", device],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if res.returncode != 0:
            raise PoolError(f"mkfs.xfs failed on {device}: {res.stderr.strip()}")
    elif fs != "xfs":
        raise PoolError(f"{image} holds {fs}, not an xfs pool; refusing to touch it")
    mountpoint.mkdir(parents=True, exist_ok=True)
    if not is_mounted(mountpoint):
        try:
            mounts.mount(device, str(mountpoint), "xfs", [])
        except TesseraError as exc:
            raise PoolError(str(exc)) from exc
    return device


def release_pool(image: Path, mountpoint: Path) -> None:
    """Unmount the pool and detach its loop device (volumes must be released first)."""
    try:
        mounts.unmount(str(mountpoint))
    except TesseraError as exc:
        raise PoolError(f"could not unmount {mountpoint}: {exc}") from exc
    for bound in loopdev.bound_under(image):
        loopdev.detach(bound.path)
