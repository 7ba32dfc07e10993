"""Volume files: sparse files in a pool, created atomically, grown only.

A crash at any point must leave either no volume or a complete one: the
file is built under a hidden temporary name and hard-linked into place
(which, unlike rename, never replaces an existing volume), so a half-made
file never carries a volume's name. Stale temporaries are swept at start.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from node_agent.pools import Pool
from node_agent.snapshots import copy_into
from tessera.errors import AlreadyExists, NotFound, OutOfRange, ResourceExhausted
from tessera.models import AgentVolume
from tessera.system.files import TMP_PREFIX, fsync_path, temporary_beside

log = logging.getLogger(__name__)


def describe(pool: Pool, volume_id: str) -> AgentVolume:
    """The volume as the API reports it; NotFound when the file is absent."""
    path = pool.volume_path(volume_id)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise NotFound(f"volume {volume_id} not found in pool {pool.name}") from None
    return _model(pool, volume_id, path, st)


def _model(pool: Pool, volume_id: str, path: Path, st: os.stat_result) -> AgentVolume:
    return AgentVolume(
        id=volume_id,
        pool=pool.name,
        size_bytes=st.st_size,
        path=str(path),
        allocated_bytes=st.st_blocks * 512,
    )


def list_all(pools: Iterable[Pool]) -> list[AgentVolume]:
    """Every volume file in these pools, by pool then id (what the reconciler compares).

    Half-made temporaries are not volumes (no volume's name is on them) and
    are left out; a file deleted while we list is simply not there.
    """
    found = []
    for pool in pools:
        for volume_id, path in pool.volume_files():
            try:
                found.append(_model(pool, volume_id, path, path.lstat()))
            except FileNotFoundError:
                continue
    return found


def exists(pool: Pool, volume_id: str) -> bool:
    return pool.volume_path(volume_id).exists()


def create(pool: Pool, volume_id: str, size_bytes: int, source: Path | None = None) -> AgentVolume:
    """Create a sparse volume file; the same id and size again is a no-op.

    With `source` (a snapshot's or volume's file in the same pool), a clone:
    the source is reflinked (or copied, see snapshots.copy_into) into the
    temporary, which is then grown to `size_bytes`, before it takes the name.
    """
    path = pool.volume_path(volume_id, missing_is_not_found=False)
    if path.exists():
        return _same_size_or_conflict(pool, volume_id, size_bytes)
    check_fits(pool, size_bytes)
    with temporary_beside(path, volume_id) as (tmp, fd):
        if source is not None:
            _clone_into(pool, source, fd, size_bytes)
        _truncate(fd, size_bytes)
        try:
            os.link(tmp, path)
        except FileExistsError:
            # Lost a race with another creator (another agent instance, a retry).
            return _same_size_or_conflict(pool, volume_id, size_bytes)
        # The file, then its directory entry, made durable. Linking first
        # lets a journaling filesystem commit both in one log force (the
        # link changes the file's inode too), so the second fsync is cheap.
        try:
            os.fsync(fd)
            fsync_path(path.parent)
        except OSError:
            path.unlink(missing_ok=True)  # our link: no name without a durable file
            raise
    log.info("created volume %s (%d bytes) in pool %s", volume_id, size_bytes, pool.name)
    return describe(pool, volume_id)


def _clone_into(pool: Pool, source: Path, fd: int, size_bytes: int) -> None:
    """The source's data into the empty temporary; a source larger than the clone is refused."""
    size = source.stat().st_size
    if size > size_bytes:
        raise OutOfRange(
            f"size_bytes {size_bytes} is smaller than the source ({size} bytes)",
            field="size_bytes",
        )
    copy_into(pool, source, fd)
    if os.fstat(fd).st_size > size_bytes:  # the source grew meanwhile
        raise OutOfRange(f"size_bytes {size_bytes} is smaller than the source", field="size_bytes")


def _same_size_or_conflict(pool: Pool, volume_id: str, size_bytes: int) -> AgentVolume:
    current = describe(pool, volume_id)
    if current.size_bytes == 0:
        # Named but never sized: only a crash on a filesystem that did not keep
        # the size with the name leaves this. Empty holds no data; finish it.
        return resize(pool, volume_id, size_bytes)
    if current.size_bytes != size_bytes:
        raise AlreadyExists(
            f"volume {volume_id} exists with size {current.size_bytes}, not {size_bytes}",
            field="size_bytes",
        )
    # A retry after a crash between naming the file and fsyncing it must not
    # report success for a file that is not yet durable.
    fsync_path(Path(current.path))
    fsync_path(Path(current.path).parent)
    return current


def check_fits(pool: Pool, size_bytes: int) -> None:
    """Refuse a volume larger than its pool's whole filesystem (times the overcommit ratio).

    Management places within capacity; this bounds what any other caller of
    the agent can ask for. A sparse file of any size is cheap to make, but one
    that can never be written full is a promise of ENOSPC to whoever uses it.
    """
    st = os.statvfs(pool.directory)
    largest = int(st.f_blocks * st.f_frsize * pool.overcommit_ratio)
    if size_bytes > largest:
        raise OutOfRange(
            f"size_bytes {size_bytes} is larger than pool {pool.name} ({largest} bytes)",
            field="size_bytes",
        )


def _truncate(fd: int, size_bytes: int) -> None:
    """ftruncate, with the filesystem's refusals turned into explainable errors."""
    try:
        os.ftruncate(fd, size_bytes)
    except OSError as exc:
        if exc.errno in (errno.EFBIG, errno.EINVAL):
            raise OutOfRange(
                f"{size_bytes} bytes is larger than the pool filesystem allows",
                field="size_bytes",
            ) from exc
        if exc.errno == errno.ENOSPC:
            raise ResourceExhausted("pool filesystem is full") from exc
        raise


def resize(pool: Pool, volume_id: str, size_bytes: int) -> AgentVolume:
    """Grow a volume file; equal size is a no-op, shrinking is refused (data loss)."""
    current = describe(pool, volume_id)
    if size_bytes < current.size_bytes:
        raise OutOfRange(
            f"volume {volume_id} is {current.size_bytes} bytes; shrinking to {size_bytes}"
            " is not supported",
            field="size_bytes",
        )
    if size_bytes == current.size_bytes:
        return current
    check_fits(pool, size_bytes)
    fd = os.open(current.path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        _truncate(fd, size_bytes)
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("grew volume %s to %d bytes", volume_id, size_bytes)
    return describe(pool, volume_id)


def delete(pool: Pool, volume_id: str) -> None:
    """Remove a volume file; absent is fine (delete is retried after crashes)."""
    path = pool.volume_path(volume_id)
    try:
        path.unlink()
    except FileNotFoundError:
        return
    fsync_path(path.parent)
    log.info("deleted volume %s from pool %s", volume_id, pool.name)


def sweep_temporaries(pool: Pool) -> list[Path]:
    """Remove half-made files left by a crash during create; return what was removed."""
    removed = []
    for entry in pool.volumes_dir.glob(f"{TMP_PREFIX}*"):
        if entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
