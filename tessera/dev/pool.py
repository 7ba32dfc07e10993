"""A file-backed development pool: a sparse image, XFS with reflink, loop-mounted.

Production pools are directories on a filesystem on a local NVMe drive;
here the drive is an image file, so the rest of the stack cannot tell the
difference. The image is formatted only when it is blank: a restart of
`dev up` on the same state directory keeps every volume.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from csi_driver.mounts import probe_filesystem
from tessera.errors import TesseraError

TIMEOUT = 60


class PoolError(RuntimeError):
    pass


def _run(args: list[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def loop_devices_backed_by(prefix: Path) -> list[tuple[str, str]]:
    """(device, backing file) of every loop device whose backing file is under prefix."""
    res = _run(["losetup", "--json", "--list", "--output", "NAME,BACK-FILE"])
    if res.returncode != 0 or not res.stdout.strip():
        return []
    found = []
    root = str(prefix.resolve())
    for dev in json.loads(res.stdout).get("loopdevices", []):
        back = (dev.get("back-file") or "").removesuffix(" (deleted)")
        if back == root or back.startswith(root + os.sep):
            found.append((dev["name"], back))
    return found


def is_mounted(path: Path) -> bool:
    return os.path.ismount(path)


def ensure_pool(image: Path, mountpoint: Path, size_bytes: int) -> str:
    """Create (if new), attach and mount the pool image; return its loop device."""
    if not image.exists():
        with open(image, "xb") as f:
            f.truncate(size_bytes)
    attached = [dev for dev, back in loop_devices_backed_by(image) if back == str(image.resolve())]
    if attached:
        device = attached[0]
    else:
        res = _run(["losetup", "--find", "--show", str(image)])
        if res.returncode != 0:
            raise PoolError(f"losetup failed for {image}: {res.stderr.strip()}")
        device = res.stdout.strip()
    try:
        fs = probe_filesystem(device)
    except TesseraError as exc:
        raise PoolError(str(exc)) from exc
    if fs is None:
        res = _run(["mkfs.xfs", "-q", "-K", "-m", "reflink=1", device], timeout=120)
        if res.returncode != 0:
            raise PoolError(f"mkfs.xfs failed on {device}: {res.stderr.strip()}")
    elif fs != "xfs":
        raise PoolError(f"{image} holds {fs}, not an xfs pool; refusing to touch it")
    mountpoint.mkdir(parents=True, exist_ok=True)
    if not is_mounted(mountpoint):
        res = _run(["mount", "-t", "xfs", device, str(mountpoint)])
        if res.returncode != 0:
            raise PoolError(f"mounting {device} on {mountpoint} failed: {res.stderr.strip()}")
    return device


def release_pool(image: Path, mountpoint: Path) -> None:
    """Unmount the pool and detach its loop device (volumes must be released first)."""
    if is_mounted(mountpoint):
        res = _run(["umount", str(mountpoint)])
        if res.returncode != 0:
            raise PoolError(f"could not unmount {mountpoint}: {res.stderr.strip()}")
    for dev, _ in loop_devices_backed_by(image):
        _run(["losetup", "-d", dev])
