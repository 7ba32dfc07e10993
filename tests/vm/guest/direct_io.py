"""Reads and writes that reach the device, past this kernel's page cache (guest tests)."""

from __future__ import annotations

import mmap
import os


def write_direct(device: str, data: bytes, offset: int) -> None:
    """Write with O_DIRECT from an aligned buffer, then fsync."""
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        assert os.pwritev(fd, [buf], offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_direct(device: str, offset: int, length: int) -> bytes:
    """Read past every page cache of this kernel (O_DIRECT, aligned buffer)."""
    buf = mmap.mmap(-1, length)
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        assert os.preadv(fd, [buf], offset) == length
    finally:
        os.close(fd)
    return bytes(buf)
