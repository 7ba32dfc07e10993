"""Files made crash-safe: built under a hidden temporary name, fsynced, then named.

Volume and snapshot files (node_agent.volumes, node_agent.snapshots) are
built this way so that a crash at any point leaves either no file under
the real name or a complete one; a half-made temporary carries the
TMP_PREFIX, which the agent sweeps at start.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_PREFIX = ".tmp-"


@contextmanager
def temporary_beside(path: Path, name: str) -> Iterator[tuple[Path, int]]:
    """(temporary path, write fd) of a new empty 0600 file in `path`'s directory.

    The caller fills it and hard-links it to `path` (a link, unlike a
    rename, never replaces an existing file); the temporary name is removed
    on the way out either way, so only the linked name (if any) remains.
    """
    tmp = path.with_name(f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            yield tmp, fd
        finally:
            os.close(fd)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_path(path: Path) -> None:
    """Make a file, or a directory's entries, durable (a crash cannot lose them)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
