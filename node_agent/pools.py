"""Pools: a name and a directory on a local (NVMe) filesystem.

Every volume file path is derived here and only here, from a validated
volume id, and checked to stay inside the pool: an id can never make the
agent touch a file outside its pools.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from tessera.errors import InvalidArgument
from tessera.ids import check_name, check_volume_id, is_volume_id

VOLUMES_SUBDIR = "volumes"
VOLUME_SUFFIX = ".img"


@dataclass(frozen=True)
class Pool:
    """A pool directory; `directory` is stored resolved (absolute, no symlinks)."""

    name: str
    directory: Path

    @classmethod
    def open(cls, name: str, directory: str | Path) -> Pool:
        """Validate and prepare a pool; the directory must already exist."""
        check_name(name, "pool")
        path = Path(directory).resolve()
        if not path.is_dir():
            raise InvalidArgument(f"pool {name}: {path} is not a directory", field="pool")
        pool = cls(name=name, directory=path)
        if pool.volumes_dir.is_symlink():
            # A symlinked volumes/ could point anywhere; refuse instead of following it.
            raise InvalidArgument(f"pool {name}: {pool.volumes_dir} is a symlink", field="pool")
        pool.volumes_dir.mkdir(mode=0o700, exist_ok=True)
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

    def volume_id_of(self, path: str | Path) -> str | None:
        """The volume id a file in this pool belongs to, or None if it is not ours."""
        p = Path(path)
        if p.parent != self.volumes_dir or p.suffix != VOLUME_SUFFIX:
            return None
        return p.stem if is_volume_id(p.stem) else None

    def capacity_bytes(self) -> int:
        """Total size of the pool filesystem (what management places against)."""
        st = os.statvfs(self.directory)
        return st.f_blocks * st.f_frsize

    def free_bytes(self) -> int:
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize


def parse_pool_spec(spec: str) -> Pool:
    """`NAME=DIR` from the command line."""
    name, sep, directory = spec.partition("=")
    if not sep or not name or not directory:
        raise InvalidArgument(f"--pool {spec!r}: expected NAME=DIR", field="pool")
    return Pool.open(name, directory)
