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
    return _ioctl(mountpoint, FIFREEZE, already=errno.EBUSY)


def thaw(mountpoint: str) -> bool:
    """Thaw it; False when it was not frozen (EINVAL), which is fine: thaw is retried."""
    return _ioctl(mountpoint, FITHAW, already=errno.EINVAL)


def _ioctl(mountpoint: str, request: int, already: int) -> bool:
    """Issue `request`; False when the kernel answers `already` (the state is already so)."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, request, 0)
    except OSError as exc:
        if exc.errno == already:
            return False
        raise
    finally:
        os.close(fd)
    return True
