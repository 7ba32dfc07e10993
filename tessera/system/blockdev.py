"""Facts about block devices read from sysfs (no root, no subprocess needed)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

SECTOR = 512
SYS_BLOCK = Path("/sys/class/block")


def size_bytes(device: str) -> int:
    """The device's current size as the kernel sees it (sysfs counts 512-byte sectors)."""
    name = os.path.basename(os.path.realpath(device))
    return int((SYS_BLOCK / name / "size").read_text().strip()) * SECTOR


def in_use(device: str) -> bool:
    """True when something holds the device exclusively (a mounted filesystem, dm, md).

    Detaching such a device would only be deferred by the kernel until the
    holder lets go, leaving a mounted filesystem without its symlink; the
    caller must unmount first.
    """
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as exc:
        return exc.errno == errno.EBUSY
    os.close(fd)
    return False
