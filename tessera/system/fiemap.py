"""A file's extent map (FS_IOC_FIEMAP): which logical ranges sit on which physical blocks.

Snapshot metadata is computed from it, never by reading data: two reflinked
files that map a logical range to the same physical blocks hold the same
bytes there (copy-on-write gives a writer new blocks).
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path
from typing import NamedTuple

#: _IOWR('f', 11, struct fiemap)
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1  # write dirty data back first: delayed allocations get real blocks

EXTENT_LAST = 0x1
EXTENT_UNKNOWN = 0x2  # the data's location is not known (yet)
EXTENT_DELALLOC = 0x4  # delayed allocation: no physical block yet
EXTENT_ENCODED = 0x8
EXTENT_NOT_ALIGNED = 0x100
EXTENT_DATA_INLINE = 0x200
EXTENT_DATA_TAIL = 0x400
EXTENT_UNWRITTEN = 0x800  # allocated but reads as zeroes
EXTENT_SHARED = 0x2000  # another file (a reflink) maps the same blocks
#: flags under which fe_physical says nothing comparable about where the data is
NO_PHYSICAL = (
    EXTENT_UNKNOWN
    | EXTENT_DELALLOC
    | EXTENT_ENCODED
    | EXTENT_NOT_ALIGNED
    | EXTENT_DATA_INLINE
    | EXTENT_DATA_TAIL
)

_HEAD = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQ16xI12x")  # logical, physical, length, flags
_BATCH = 512
_ALL = 2**64 - 1


class Extent(NamedTuple):
    logical: int
    physical: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.logical + self.length

    @property
    def unwritten(self) -> bool:
        return bool(self.flags & EXTENT_UNWRITTEN)

    @property
    def shared(self) -> bool:
        return bool(self.flags & EXTENT_SHARED)

    @property
    def last(self) -> bool:
        return bool(self.flags & EXTENT_LAST)

    @property
    def placed(self) -> bool:
        """Whether `physical` names real blocks (comparable between files)."""
        return not self.flags & NO_PHYSICAL


def extents_fd(fd: int, start: int = 0, end: int = _ALL, *, sync: bool = True) -> list[Extent]:
    """The extents of the open file that overlap [start, end), in logical order.

    Paged through _BATCH at a time; the first and last may reach outside
    the range (they are the filesystem's extents, not clipped).
    """
    found: list[Extent] = []
    while start < end:
        batch = _query(fd, start, end, sync)
        found.extend(batch)
        if not batch or batch[-1].last:
            break
        start = batch[-1].end
        sync = False  # written back once is enough
    return found


def extents(path: str | Path, *, sync: bool = True) -> list[Extent]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return extents_fd(fd, sync=sync)
    finally:
        os.close(fd)


def _query(fd: int, start: int, end: int, sync: bool) -> list[Extent]:
    buf = bytearray(_HEAD.size + _EXTENT.size * _BATCH)
    flags = FIEMAP_FLAG_SYNC if sync else 0
    _HEAD.pack_into(buf, 0, start, end - start, flags, 0, _BATCH, 0)
    fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
    mapped = _HEAD.unpack_from(buf, 0)[3]
    body = memoryview(buf)[_HEAD.size : _HEAD.size + mapped * _EXTENT.size]
    return [Extent._make(fields) for fields in _EXTENT.iter_unpack(body)]
