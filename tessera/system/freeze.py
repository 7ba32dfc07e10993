"""Freezing a mounted filesystem (FIFREEZE/FITHAW) for the instant of a snapshot.

A frozen filesystem has flushed its journal and data and blocks every new
write until thawed: a copy of its device taken meanwhile is consistent.

The fd functions exist because a path can change under a freeze: once the
mountpoint is unmounted (a bind elsewhere keeps the superblock frozen) or
mounted over, a thaw by path reaches another filesystem and answers EINVAL
("not frozen") while ours stays frozen. A directory fd opened at freeze
time pins the superblock we froze, so FITHAW on it always reaches it.
"""

from __future__ import annotations

import errno
import fcntl
import os

#: _IOWR('X', 119, int) and _IOWR('X', 120, int)
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878


def open_dir(mountpoint: str) -> int:
    """An fd on the mountpoint's root: a handle on its filesystem for freeze_fd/thaw_fd."""
    return os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def device_of(fd: int) -> str:
    """`major:minor` of the filesystem the fd is on (as the mount table writes it)."""
    dev = os.fstat(fd).st_dev
    return f"{os.major(dev)}:{os.minor(dev)}"


def freeze_fd(fd: int) -> bool:
    """Freeze the fd's filesystem; False when it was frozen already.

    EBUSY means someone else froze it: it is frozen (what a caller wants),
    but not ours to thaw. Blocks while the filesystem syncs: on a stalled
    backend, for as long as it stays stalled.
    """
    return _ioctl(fd, FIFREEZE, already=errno.EBUSY)


def thaw_fd(fd: int) -> bool:
    """Thaw the fd's filesystem; False when it was not frozen (EINVAL): thaw is retried."""
    return _ioctl(fd, FITHAW, already=errno.EINVAL)


def freeze(mountpoint: str) -> bool:
    """freeze_fd of what is mounted at `mountpoint` now."""
    fd = open_dir(mountpoint)
    try:
        return freeze_fd(fd)
    finally:
        os.close(fd)


def thaw(mountpoint: str) -> bool:
    """thaw_fd of what is mounted at `mountpoint` now (see the module note on paths)."""
    fd = open_dir(mountpoint)
    try:
        return thaw_fd(fd)
    finally:
        os.close(fd)


def _ioctl(fd: int, request: int, already: int) -> bool:
    """Issue `request`; False when the kernel answers `already` (the state is already so)."""
    try:
        fcntl.ioctl(fd, request, 0)
    except OSError as exc:
        if exc.errno == already:
            return False
        raise
    return True
