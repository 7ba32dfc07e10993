"""Snapshot files: `<pool>/snapshots/<snap-id>`, a reflink (or full copy) of a volume file.

Made like a volume file (see node_agent.volumes): built under a temporary
name, fsynced, hard-linked into place, so a crash leaves either no snapshot
or a complete one, and a half-made temporary is swept at start. The source
volume and the method ride on the file as extended attributes, set before
the link: a snapshot file always says where it came from.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from node_agent.pools import Pool
from tessera.errors import AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted
from tessera.models import AgentSnapshot, SnapshotMethod
from tessera.system import reflink
from tessera.system.files import TMP_PREFIX, fsync_path, temporary_beside

log = logging.getLogger(__name__)

XATTR_SOURCE = "user.tessera.source"
XATTR_METHOD = "user.tessera.method"


def describe(pool: Pool, snapshot_id: str) -> AgentSnapshot:
    """The snapshot as the API reports it; NotFound when the file is absent."""
    path = pool.snapshot_path(snapshot_id)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise NotFound(f"snapshot {snapshot_id} not found in pool {pool.name}") from None
    return _model(pool, snapshot_id, path, st)


def _model(pool: Pool, snapshot_id: str, path: Path, st: os.stat_result) -> AgentSnapshot:
    return AgentSnapshot(
        id=snapshot_id,
        pool=pool.name,
        source_volume_id=_xattr(path, XATTR_SOURCE),
        size_bytes=st.st_size,
        path=str(path),
        method=SnapshotMethod(_xattr(path, XATTR_METHOD) or SnapshotMethod.REFLINK),
        allocated_bytes=st.st_blocks * 512,
    )


def _xattr(path: Path, name: str) -> str:
    try:
        return os.getxattr(path, name).decode()
    except OSError:
        return ""


def exists(pool: Pool, snapshot_id: str) -> bool:
    return pool.snapshot_path(snapshot_id).exists()


def list_all(pools: Iterable[Pool]) -> list[AgentSnapshot]:
    """Every snapshot file in these pools, by pool then id; temporaries are not snapshots."""
    found = []
    for pool in pools:
        for snapshot_id, path in pool.snapshot_files():
            try:
                found.append(_model(pool, snapshot_id, path, path.lstat()))
            except FileNotFoundError:
                continue
    return found


def create(pool: Pool, snapshot_id: str, source_volume_id: str, source: Path) -> AgentSnapshot:
    """Cut the snapshot of the volume file `source`; the same id and source again is a no-op."""
    path = pool.snapshot_path(snapshot_id, missing_is_not_found=False)
    if path.exists():
        return _same_source_or_conflict(pool, snapshot_id, source_volume_id)
    with temporary_beside(path, snapshot_id) as (tmp, fd):
        method = copy_into(pool, source, fd)
        os.setxattr(fd, XATTR_SOURCE, source_volume_id.encode())
        os.setxattr(fd, XATTR_METHOD, str(method).encode())
        os.fsync(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _same_source_or_conflict(pool, snapshot_id, source_volume_id)
        fsync_path(path.parent)
    log.info("snapshot %s of volume %s cut in pool %s", snapshot_id, source_volume_id, pool.name)
    return describe(pool, snapshot_id)


def copy_into(pool: Pool, source: Path, dst_fd: int) -> SnapshotMethod:
    """Fill the empty file `dst_fd` with `source`'s data: reflink, else a copy if allowed.

    The pool's filesystem decides (the ioctl's answer, not a guess); a pool
    that can do neither refuses, naming the pool and the two ways out.
    """
    src_fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            reflink.clone(src_fd, dst_fd)
            return SnapshotMethod.REFLINK
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise ResourceExhausted(f"pool {pool.name} is full") from exc
            if exc.errno not in reflink.NO_REFLINK:
                raise
        if not pool.copy_fallback:
            raise FailedPrecondition(
                f"pool {pool.name} cannot make snapshots or clones: its filesystem cannot "
                "reflink; put the pool on XFS with reflink=1 (or btrfs), or start the "
                "node-agent with --copy-fallback to make full copies"
            )
        try:
            reflink.copy_sparse(src_fd, dst_fd)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise ResourceExhausted(f"pool {pool.name} is full") from exc
            raise
        return SnapshotMethod.COPY
    finally:
        os.close(src_fd)


def _same_source_or_conflict(pool: Pool, snapshot_id: str, source_volume_id: str) -> AgentSnapshot:
    current = describe(pool, snapshot_id)
    if current.source_volume_id != source_volume_id:
        raise AlreadyExists(
            f"snapshot {snapshot_id} exists of volume {current.source_volume_id}, "
            f"not {source_volume_id}",
            field="source_volume_id",
        )
    # a retry after a crash between the link and the directory's fsync
    fsync_path(Path(current.path).parent)
    return current


def delete(pool: Pool, snapshot_id: str) -> None:
    """Remove the snapshot file; absent is fine. Shared blocks stay with whoever shares them."""
    path = pool.snapshot_path(snapshot_id)
    try:
        path.unlink()
    except FileNotFoundError:
        return
    fsync_path(path.parent)
    log.info("deleted snapshot %s from pool %s", snapshot_id, pool.name)


def sweep_temporaries(pool: Pool) -> list[Path]:
    """Remove half-made snapshot files and probe files left by a crash; return them."""
    removed = []
    leftovers = [
        *pool.snapshots_dir.glob(f"{TMP_PREFIX}*"),
        *pool.directory.glob(f"{reflink.PROBE_PREFIX}*"),  # a probe cut short by a crash
    ]
    for entry in leftovers:
        if entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
