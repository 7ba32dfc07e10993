"""Freezing a mounted filesystem (FIFREEZE/FITHAW) for the instant of a snapshot.

A frozen filesystem has flushed its journal and data and blocks every new
write until thawed: a copy of its device taken meanwhile is consistent.
"""

from __future__ import annotations

import errno
import fcntl
import os

#: _IOWR('X', 119, int) and _IOWR('X', 120, int)
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878


def freeze(mountpoint: str) -> bool:
    """Freeze the filesystem mounted at `mountpoint`; False when it was frozen already.

    EBUSY means someone else froze it: it is frozen (what a caller wants),
    but not ours to thaw.
    """
    try:
        _ioctl(mountpoint, FIFREEZE)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return False
        raise
    return True


def thaw(mountpoint: str) -> bool:
    """Thaw it; False when it was not frozen (EINVAL), which is fine: thaw is retried."""
    try:
        _ioctl(mountpoint, FITHAW)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    return True


def _ioctl(mountpoint: str, request: int) -> None:
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, request, 0)
    finally:
        os.close(fd)
