"""File-backed pools: a sparse image, XFS with reflink, loop-mounted.

Production pools are directories on a filesystem on a local NVMe drive.
A file pool stands in for the drive with an image file, for trying Tessera
on a laptop cluster (`--file-pool NAME=IMAGE:SIZE`) and for `tessera dev
up`; the rest of the stack cannot tell the difference.

Every start converges on the same state, whatever the previous run left:

- the image is created sparse when missing, and formatted only when its
  probe says blank: a restart keeps every volume;
- a loop device already bound to the image is reused: a second loop
  device on the same image would let two XFS instances write the same
  blocks and corrupt the pool;
- a mount of that device at the mountpoint is reused; any other mount
  there is refused rather than stacked on;
- SIZE never shrinks an image (its last blocks may hold volumes): an image
  larger than SIZE is refused with the size to ask for. An image smaller
  than SIZE is grown (file, loop device, then XFS online), each step
  idempotent, so a crash between them is finished by the next start.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tessera.errors import FailedPrecondition, Internal, InvalidArgument, Unavailable
from tessera.ids import check_name
from tessera.system import filesystems, loopdev, mounts
from tessera.units import format_size, parse_size

#: mkfs.xfs (xfsprogs >= 5.19) refuses filesystems smaller than 300 MiB
MIN_SIZE = 300 * 1024**2
#: where the agent mounts its file pools, under --state-dir
SUBDIR = "file-pools"
MKFS_TIMEOUT = 600


@dataclass(frozen=True)
class FilePoolSpec:
    """One `--file-pool NAME=IMAGE:SIZE`: IMAGE absolute, SIZE in bytes."""

    name: str
    image: Path
    size_bytes: int


def parse_file_pool_spec(spec: str) -> FilePoolSpec:
    """`NAME=IMAGE:SIZE`, refused with the part that is wrong.

    IMAGE must be absolute: the agent runs in a container whose working
    directory means nothing on the host, and a relative path would put the
    pool somewhere nobody looks after a restart. `..` is refused too: the
    path is the one the admin will find the image at, as written.
    """
    flag = f"--file-pool {spec!r}"
    name, sep, rest = spec.partition("=")
    image, colon, size_text = rest.rpartition(":")
    if not sep or not name or not colon or not image or not size_text:
        raise InvalidArgument(
            f"{flag}: expected NAME=IMAGE:SIZE, e.g. default=/var/lib/tessera/pool.img:20G",
            field="file_pool",
        )
    try:
        check_name(name, "file_pool")
    except InvalidArgument as exc:
        raise InvalidArgument(f"{flag}: the pool name: {exc}", field="file_pool") from None
    path = Path(image)
    if not path.is_absolute() or ".." in path.parts:
        raise InvalidArgument(
            f"{flag}: the image {image!r} must be an absolute path without '..'",
            field="file_pool",
        )
    try:
        size = parse_size(size_text)
    except ValueError as exc:
        raise InvalidArgument(f"{flag}: {exc}", field="file_pool") from None
    if size < MIN_SIZE:
        raise InvalidArgument(
            f"{flag}: {format_size(size)} is too small; XFS needs at least {format_size(MIN_SIZE)}",
            field="file_pool",
        )
    return FilePoolSpec(name, path, size)


def mountpoint_of(state_dir: Path, name: str) -> Path:
    return state_dir / SUBDIR / name


def is_mounted(path: Path) -> bool:
    return mounts.is_mount(str(path))


def ensure_file_pool(image: Path, mountpoint: Path, size_bytes: int) -> str:
    """Create (if new), attach, format (if blank) and mount the image; its loop device.

    The image is attached with direct I/O, as the agent attaches volumes:
    the pool filesystem's writes and flushes then go straight to the image
    instead of through a second page cache.
    """
    try:
        grown = _ensure_image(image, size_bytes)
    except OSError as exc:
        raise Unavailable(f"cannot create or size {image}: {exc}") from exc
    device = _ensure_device(image)
    fs = filesystems.probe_filesystem(device)
    if fs is None:
        _format(device)
    elif fs != "xfs":
        raise FailedPrecondition(
            f"{image} holds {fs}, not an XFS pool; refusing to touch it", field="file_pool"
        )
    _ensure_mount(device, mountpoint)
    if grown or _device_short(device, image):
        _grow(device, mountpoint)
    return device


def _ensure_image(image: Path, size_bytes: int) -> bool:
    """The sparse image, at least `size_bytes`; whether it was grown now."""
    image.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        with open(image, "xb") as f:
            f.truncate(size_bytes)
        return False
    except FileExistsError:
        pass
    if not image.is_file():
        raise FailedPrecondition(f"{image} exists and is not a regular file", field="file_pool")
    current = image.stat().st_size
    if current > size_bytes:
        raise FailedPrecondition(
            f"{image} is {format_size(current)} ({current} bytes), larger than the "
            f"{format_size(size_bytes)} asked for; a pool is never shrunk (its volumes may use "
            f"the end of it): ask for at least {current} bytes",
            field="file_pool",
        )
    if current < size_bytes:
        os.truncate(image, size_bytes)  # only ever extends: sparse, no data moves
        return True
    return False


def _ensure_device(image: Path) -> str:
    """The loop device bound to the image: the one already there, else a new one."""
    resolved = str(image.resolve())
    try:
        bound = [b for b in loopdev.bound_under(image) if b.backing == resolved]
        if len(bound) > 1:
            # which one holds the live filesystem is not ours to guess: mounting
            # through the other would corrupt it
            raise FailedPrecondition(
                f"{image} is bound to several loop devices "
                f"({', '.join(b.path for b in bound)}); detach the ones not mounted",
                field="file_pool",
            )
        if bound:
            if bound[0].readonly:
                raise FailedPrecondition(
                    f"{image} is bound read-only to {bound[0].path}; detach it first",
                    field="file_pool",
                )
            return bound[0].path
        device, _ = loopdev.attach(resolved, readonly=False, direct_io=True)
    except OSError as exc:
        raise Unavailable(f"cannot attach {image} to a loop device: {exc}") from exc
    return device


def _format(device: str) -> None:
    """mkfs.xfs with reflink (snapshots and clones are reflink copies); -K: sparse image."""
    try:
        res = subprocess.run(
            ["mkfs.xfs", "-q", "-K", "-m", "reflink=1", device],
            capture_output=True,
            text=True,
            timeout=MKFS_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"mkfs.xfs on {device} did not run: {exc}") from exc
    if res.returncode != 0:
        raise Internal(f"mkfs.xfs failed on {device}: {res.stderr.strip()}")


def _ensure_mount(device: str, mountpoint: Path) -> None:
    """Mount the device at the mountpoint, unless it is already; refuse any other mount there."""
    mountpoint.mkdir(parents=True, exist_ok=True, mode=0o700)
    if mounts.mount_of_device(str(mountpoint), device) is not None:
        return
    if is_mounted(mountpoint):
        raise FailedPrecondition(
            f"{mountpoint} has another filesystem mounted on it, not {device}; unmount it",
            field="file_pool",
        )
    mounts.mount(device, str(mountpoint), "xfs", [])


def _device_short(device: str, image: Path) -> bool:
    return filesystems.device_size(device) < image.stat().st_size


def _grow(device: str, mountpoint: Path) -> None:
    """The loop device, then XFS, take the image's new size (both no-ops when they have it)."""
    try:
        loopdev.set_capacity(device)
    except OSError as exc:
        raise Unavailable(f"cannot resize {device}: {exc}") from exc
    filesystems.resize_filesystem(device, str(mountpoint), "xfs")


def release_file_pool(image: Path, mountpoint: Path) -> None:
    """Unmount the pool and detach its loop device (its volumes must be released first).

    Neither being mounted nor attached is fine: this is also a cleanup.
    """
    mounts.unmount(str(mountpoint))
    for bound in loopdev.bound_under(image):
        loopdev.detach(bound.path)


def open_file_pools(specs: list[str], state_dir: Path, taken: set[str]) -> dict[str, Path]:
    """Every `--file-pool` spec ensured and mounted; pool name -> its directory.

    All specs are checked (syntax, names unique among themselves and the
    `taken` --pool names) before any image is touched.
    """
    parsed = [parse_file_pool_spec(spec) for spec in specs]
    seen = set(taken)
    for spec in parsed:
        if spec.name in seen:
            raise InvalidArgument(
                f"--file-pool {spec.name}: pool {spec.name} is given twice", field="file_pool"
            )
        seen.add(spec.name)
    found: dict[str, Path] = {}
    for spec in parsed:
        directory = mountpoint_of(state_dir, spec.name)
        ensure_file_pool(spec.image, directory, spec.size_bytes)
        found[spec.name] = directory
    return found
