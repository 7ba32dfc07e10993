"""Reflink copies (FICLONE) and the sparse full copy used where a filesystem cannot reflink.

A reflink shares the source's extents with the new file: constant time and
no space until one side writes (copy-on-write). The fallback copies only
the data ranges (SEEK_DATA/SEEK_HOLE), so a sparse volume's holes stay holes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import uuid
from pathlib import Path

#: _IOW(0x94, 9, int): clone the whole source file into the destination
FICLONE = 0x40049409
#: the errors a filesystem (or a pair of them) answers when it cannot share extents
NO_REFLINK = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS})
_CHUNK = 64 * 1024**2
#: the scratch files `can_reflink` makes (and removes) in the directory it probes
PROBE_PREFIX = ".reflink-probe-"


def clone(src_fd: int, dst_fd: int) -> None:
    """Make dst share all of src's extents (dst takes src's size); OSError when it cannot."""
    fcntl.ioctl(dst_fd, FICLONE, src_fd)


def can_reflink(directory: str | Path) -> bool:
    """Whether files in `directory` can be reflinked: tried on two scratch files there.

    Asking the filesystem type is not enough (XFS made with reflink=0,
    btrfs, bcachefs, overlay...): the one true answer is the ioctl's.
    """
    base = Path(directory) / f"{PROBE_PREFIX}{uuid.uuid4().hex[:8]}"
    src, dst = base.with_suffix(".a"), base.with_suffix(".b")
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        a = os.open(src, flags, 0o600)
        try:
            os.pwrite(a, b"\1" * 4096, 0)
            b = os.open(dst, flags, 0o600)
            try:
                clone(a, b)
                return True
            except OSError as exc:
                if exc.errno in NO_REFLINK:
                    return False
                raise
            finally:
                os.close(b)
        finally:
            os.close(a)
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)


def copy_sparse(src_fd: int, dst_fd: int) -> None:
    """Copy src into dst (sized as src), data ranges only: holes stay holes.

    copy_file_range keeps the bytes in the kernel; where a filesystem offers
    it, the kernel may share or offload the copy, never read it into Python.
    """
    size = os.fstat(src_fd).st_size
    os.ftruncate(dst_fd, size)
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src_fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break  # only a hole is left
            raise
        end = os.lseek(src_fd, start, os.SEEK_HOLE)
        _copy_range(src_fd, dst_fd, start, end)
        offset = end


def _copy_range(src_fd: int, dst_fd: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        done = os.copy_file_range(src_fd, dst_fd, min(_CHUNK, end - pos), pos, pos)
        if done == 0:
            break  # the source shrank under us: what is left reads as zeroes anyway
        pos += done
