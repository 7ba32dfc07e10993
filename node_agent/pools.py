"""Pools: a name and a directory on a local (NVMe) filesystem.

Every volume file path is derived here and only here, from a validated
volume id, and checked to stay inside the pool: an id can never make the
agent touch a file outside its pools.

A pool's capacity is what its filesystem can really still write for our
volumes (see `Pool.capacity_bytes`), not the filesystem's size: management
promises volumes against it, and a promise the filesystem cannot keep
turns into ENOSPC under a pod.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from tessera.errors import InvalidArgument
from tessera.ids import check_name, check_snapshot_id, check_volume_id, is_snapshot_id, is_volume_id
from tessera.models import SnapshotMethod
from tessera.system import fiemap, reflink

VOLUMES_SUBDIR = "volumes"
SNAPSHOTS_SUBDIR = "snapshots"
VOLUME_SUFFIX = ".img"
MiB = 1024**2


@dataclass(frozen=True)
class Reserve:
    """Space held back from placement for filesystem metadata and growth.

    Writing a volume's blocks also allocates metadata the volume's size does
    not show (extent trees, XFS btrees, journal growth) and the filesystem
    may hold other files; a pool promised to its last block would answer
    ENOSPC to a pod. The reserve is `percent` of the filesystem's size, but
    at least `minimum_bytes` (small pools need proportionally more).
    """

    percent: float = 2.0
    minimum_bytes: int = 64 * MiB

    def __post_init__(self) -> None:
        if not 0 <= self.percent < 100:
            raise InvalidArgument("the capacity reserve must be 0 to 99 percent", field="reserve")
        if self.minimum_bytes < 0:
            raise InvalidArgument("the minimum capacity reserve must be >= 0", field="reserve")

    def bytes_for(self, filesystem_bytes: int) -> int:
        return max(self.minimum_bytes, math.ceil(filesystem_bytes * self.percent / 100))


DEFAULT_RESERVE = Reserve()


@dataclass(frozen=True)
class Pool:
    """A pool directory; `directory` is stored resolved (absolute, no symlinks).

    `overcommit_ratio` above 1.0 promises more than the filesystem holds
    (thin provisioning, for volumes that are never written full); it is
    only ever what the operator asked for, per pool. `copy_fallback`: make
    snapshots and clones as full copies where the filesystem cannot reflink
    (the agent's --copy-fallback) instead of refusing them.
    """

    name: str
    directory: Path
    reserve: Reserve = DEFAULT_RESERVE
    overcommit_ratio: float = 1.0
    copy_fallback: bool = False

    @classmethod
    def open(
        cls,
        name: str,
        directory: str | Path,
        *,
        reserve: Reserve = DEFAULT_RESERVE,
        overcommit_ratio: float = 1.0,
        copy_fallback: bool = False,
    ) -> Pool:
        """Validate and prepare a pool; the directory must already exist."""
        check_name(name, "pool")
        if not (math.isfinite(overcommit_ratio) and overcommit_ratio >= 1.0):
            raise InvalidArgument(
                f"pool {name}: overcommit ratio {overcommit_ratio} must be a number >= 1.0",
                field="overcommit",
            )
        path = Path(directory).resolve()
        if not path.is_dir():
            raise InvalidArgument(f"pool {name}: {path} is not a directory", field="pool")
        pool = cls(
            name=name,
            directory=path,
            reserve=reserve,
            overcommit_ratio=overcommit_ratio,
            copy_fallback=copy_fallback,
        )
        for sub in (pool.volumes_dir, pool.snapshots_dir):
            if sub.is_symlink():
                # A symlinked volumes/ could point anywhere; refuse instead of following it.
                raise InvalidArgument(f"pool {name}: {sub} is a symlink", field="pool")
            sub.mkdir(mode=0o700, exist_ok=True)
        pool._reflinks()  # probed now, so no scratch files appear while volumes are in use
        return pool

    @cached_property
    def volumes_dir(self) -> Path:
        return self.directory / VOLUMES_SUBDIR

    def volume_path(self, volume_id: str, *, missing_is_not_found: bool = True) -> Path:
        """`<dir>/volumes/<id>.img`, refused unless it stays inside the pool.

        The id is checked against the volume-id pattern (no `/`, no `..`) and
        the directory was resolved and checked for symlinks when the pool was
        opened, so the one way left out of the pool is a symlink planted in
        place of the file: refuse that (one lstat; this runs on every call).
        """
        check_volume_id(volume_id, missing_is_not_found=missing_is_not_found)
        path = self.volumes_dir / f"{volume_id}{VOLUME_SUFFIX}"
        if os.path.islink(path):
            raise InvalidArgument(
                f"volume path for {volume_id} leaves pool {self.name} (symlinked)",
                field="volume_id",
            )
        return path

    @cached_property
    def snapshots_dir(self) -> Path:
        return self.directory / SNAPSHOTS_SUBDIR

    def snapshot_path(self, snapshot_id: str, *, missing_is_not_found: bool = True) -> Path:
        """`<dir>/snapshots/<id>`, refused unless it stays inside the pool (as volume_path)."""
        check_snapshot_id(snapshot_id, missing_is_not_found=missing_is_not_found)
        path = self.snapshots_dir / snapshot_id
        if os.path.islink(path):
            raise InvalidArgument(
                f"snapshot path for {snapshot_id} leaves pool {self.name} (symlinked)",
                field="snapshot_id",
            )
        return path

    def snapshot_files(self) -> list[tuple[str, Path]]:
        """(snapshot id, path) of every snapshot file in the pool, by id."""
        found = []
        with os.scandir(self.snapshots_dir) as entries:
            for entry in entries:
                if is_snapshot_id(entry.name) and not entry.is_symlink():
                    found.append((entry.name, Path(entry.path)))
        return sorted(found)

    def _reflinks(self) -> bool | None:
        """The reflink probe's answer, None while it cannot run (e.g. a full pool).

        A definite answer is kept: a mounted filesystem does not gain or lose
        reflink, and a probe per heartbeat would keep scratch files coming and
        going in the pool.
        """
        if "_reflink_answer" not in self.__dict__:
            try:
                self.__dict__["_reflink_answer"] = reflink.can_reflink(self.directory)
            except OSError:
                return None
        return self.__dict__["_reflink_answer"]

    @property
    def shares_blocks(self) -> bool:
        """Whether files here can share blocks (reflink): else no extent map is needed.

        A probe that could not run answers yes: the slower count is right too.
        """
        return self._reflinks() is not False

    def snapshot_method(self) -> SnapshotMethod:
        """How snapshots and clones are made here: probed (FICLONE on scratch files)."""
        if self._reflinks():
            return SnapshotMethod.REFLINK
        # no reflink, or a probe that could not run: report what a copy would do
        return SnapshotMethod.COPY if self.copy_fallback else SnapshotMethod.NONE

    def used_bytes(self) -> int:
        """Physical bytes in use on the pool's filesystem (shared extents count once)."""
        st = os.statvfs(self.directory)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def volume_id_of(self, path: str | Path) -> str | None:
        """The volume id a file in this pool belongs to, or None if it is not ours."""
        p = Path(path)
        if p.parent != self.volumes_dir or p.suffix != VOLUME_SUFFIX:
            return None
        return p.stem if is_volume_id(p.stem) else None

    def capacity_bytes(self) -> int:
        """What management may promise in this pool: the sum of volume sizes it can place.

            usable   = f_bavail + allocated bytes of our volume files - reserve
            capacity = usable * overcommit_ratio, rounded down to whole MiB

        Management subtracts the sizes of the volumes already placed here, so
        free space = capacity - sum(volume sizes). Why this holds as volumes
        fill: writing a block of a sparse volume file lowers f_bavail by one
        block and raises that file's allocation by one block, so `usable`
        stays put; volumes promised but not yet written stay subtracted in
        full by management. f_bavail (not f_bfree) leaves ext4's root
        reserve alone; the reserve covers the metadata writes allocate.

        The files are counted before statvfs is read: a write landing in
        between then makes the result smaller, never larger. Snapshot files
        count too (their blocks are ours), and reflinked blocks count once:
        see `allocated_bytes`.
        """
        allocated = self.allocated_bytes()
        st = os.statvfs(self.directory)
        available = st.f_bavail * st.f_frsize
        reserve = self.reserve.bytes_for(st.f_blocks * st.f_frsize)
        usable = max(available + allocated - reserve, 0)
        return int(usable * self.overcommit_ratio) // MiB * MiB

    def allocated_bytes(self) -> int:
        """Bytes the filesystem has allocated to this pool's volume and snapshot files.

        A file that shares no extent counts its st_blocks. Reflinked files
        (snapshots, clones and their sources) share physical blocks: counting
        each file's st_blocks would count a shared block once per file and
        promise space that does not exist, so their extents are counted as a
        union of physical ranges. FIEMAP without SYNC: a heartbeat must not
        force writeback; a delayed allocation has no block yet and is nobody
        else's, so it counts by its length.
        """
        total = 0
        shared: list[tuple[int, int]] = []
        files = [p for _, p in self.volume_files()] + [p for _, p in self.snapshot_files()]
        for path in files:
            try:
                total += _allocated_of(path, shared) if self.shares_blocks else _blocks_of(path)
            except FileNotFoundError:
                continue  # deleted meanwhile: its blocks are back in f_bavail
        return total + _union_length(shared)

    def volume_files(self) -> list[tuple[str, Path]]:
        """(volume id, path) of every volume file in the pool, by id."""
        found = []
        with os.scandir(self.volumes_dir) as entries:
            for entry in entries:
                stem = entry.name.removesuffix(VOLUME_SUFFIX)
                if stem != entry.name and is_volume_id(stem) and not entry.is_symlink():
                    found.append((stem, Path(entry.path)))
        return sorted(found)


def parse_pool_spec(
    spec: str,
    *,
    reserve: Reserve = DEFAULT_RESERVE,
    overcommit_ratio: float = 1.0,
    copy_fallback: bool = False,
) -> Pool:
    """`NAME=DIR` from the command line."""
    name, sep, directory = spec.partition("=")
    if not sep or not name or not directory:
        raise InvalidArgument(f"--pool {spec!r}: expected NAME=DIR", field="pool")
    return Pool.open(
        name,
        directory,
        reserve=reserve,
        overcommit_ratio=overcommit_ratio,
        copy_fallback=copy_fallback,
    )


def parse_overcommit(specs: list[str]) -> dict[str, float]:
    """`NAME=RATIO` options (e.g. `--overcommit fast=1.5`) by pool name."""
    ratios: dict[str, float] = {}
    for spec in specs:
        name, sep, ratio = spec.partition("=")
        try:
            ratios[name] = float(ratio)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise InvalidArgument(
                f"--overcommit {spec!r}: expected POOL=RATIO, e.g. fast=1.5", field="overcommit"
            )
    return ratios


def _blocks_of(path: Path) -> int:
    return path.lstat().st_blocks * 512


def _allocated_of(path: Path, shared: list[tuple[int, int]]) -> int:
    """The file's unshared allocated bytes; its shared physical ranges go to `shared`."""
    st = path.lstat()
    if st.st_blocks == 0:
        return 0
    found = fiemap.extents(path, sync=False)
    if not any(e.shared for e in found):
        return st.st_blocks * 512
    own = 0
    for e in found:
        if e.shared and e.placed:
            shared.append((e.physical, e.physical + e.length))
        else:
            own += e.length
    return own


def _union_length(ranges: list[tuple[int, int]]) -> int:
    total, reach = 0, 0
    for start, end in sorted(ranges):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total
