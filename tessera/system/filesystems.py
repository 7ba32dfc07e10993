"""Filesystems on block devices: probe, make, grow, size.

Probing (libblkid) and sizing (BLKGETSIZE64) are in-process calls
(`tessera.system.syscalls`); mkfs and the resize tools run as commands,
each an argument list with a timeout. Data is never put at risk here: a
probe that fails is an error, never "blank", and mkfs is only for a device
the caller has just probed blank.
"""

from __future__ import annotations

import subprocess

from tessera.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    Misconfigured,
    Unavailable,
)
from tessera.system import syscalls as linux

TIMEOUT = 120
MKFS_TIMEOUT = 600


def _run(args: list[str], timeout: float | None = TIMEOUT) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise Unavailable(f"{args[0]} timed out after {timeout:.0f}s") from exc


def _check(args: list[str], what: str, timeout: float | None = TIMEOUT) -> None:
    res = _run(args, timeout)
    if res.returncode != 0:
        raise Internal(f"{what} failed: {res.stderr.strip() or res.stdout.strip()}")


def probe_filesystem(device: str) -> str | None:
    """The signature on a device, or None when it is blank.

    A probe that fails is an error, never "blank": formatting on a wrong
    guess would destroy data. Two signatures that contradict each other are
    not blank either.
    """
    try:
        found = linux.probe_signatures(device)
    except OSError as exc:
        raise Unavailable(
            f"could not probe {device} for a filesystem: {exc.strerror or exc}"
        ) from exc
    if found.status is linux.ProbeStatus.BLANK:
        return None
    if found.status is linux.ProbeStatus.AMBIVALENT:
        return "ambivalent signatures (more than one filesystem or partition table)"
    if found.type:
        return found.type
    if found.pttype:
        return f"partition table ({found.pttype})"
    return "an unknown signature"


def make_filesystem(device: str, fs_type: str, options: list[str]) -> None:
    """mkfs a device the caller has just probed blank."""
    if fs_type == "ext4":
        # -F: it is a whole device, not a partition; we probed it blank first.
        args = ["mkfs.ext4", "-q", "-F", *options, device]
    elif fs_type == "xfs":
        # -K: do not discard a sparse file's blocks one by one.
        args = ["mkfs.xfs", "-q", "-K", *options, device]
    else:
        raise InvalidArgument(f"fs_type {fs_type!r} is not supported", field="fs_type")
    _check(args, f"mkfs.{fs_type} on {device}", MKFS_TIMEOUT)


def resize_filesystem(device: str, mountpoint: str, fs_type: str) -> None:
    if fs_type == "xfs":
        _check(["xfs_growfs", mountpoint], f"xfs_growfs {mountpoint}")
    elif fs_type in ("ext4", "ext3", "ext2"):
        res = _run(["resize2fs", device])
        if res.returncode != 0:
            message = f"resize2fs {device} failed: {res.stderr.strip()}"
            if "Permission denied" in res.stderr:
                # a deployment to fix, not a bug (found by the CSI fuzzer, seed 7)
                raise Misconfigured(
                    f"{message} (online ext4 growth needs CAP_SYS_RESOURCE; give it to the plugin)"
                )
            raise Internal(message)
    else:
        raise FailedPrecondition(f"cannot grow a {fs_type} filesystem online")


#: a filesystem this much smaller than its device was made on a smaller one (a clone
#: or restore into a larger volume); mkfs itself leaves less than a block unused
GROW_THRESHOLD = 1024**2
_EXT = ("ext4", "ext3", "ext2")


def filesystem_size(device: str, fs_type: str) -> int | None:
    """Bytes the filesystem on `device` spans, read from its superblock (None: unknown type)."""
    if fs_type in _EXT:
        res = _run(["dumpe2fs", "-h", device])
        fields = _colon_fields(res.stdout)
        count, size = fields.get("Block count"), fields.get("Block size")
    elif fs_type == "xfs":
        res = _run(["xfs_db", "-r", "-c", "sb 0", "-c", "print dblocks blocksize", device])
        fields = {
            k.strip(): v.strip()
            for k, _, v in (ln.partition("=") for ln in res.stdout.splitlines())
        }
        count, size = fields.get("dblocks"), fields.get("blocksize")
    else:
        return None
    if res.returncode != 0 or not (count and size and count.isdigit() and size.isdigit()):
        raise Internal(
            f"cannot read the size of the {fs_type} filesystem on {device}: "
            f"{res.stderr.strip() or 'no size in its superblock'}"
        )
    return int(count) * int(size)


def _colon_fields(text: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines())}


def needs_growth(device: str, fs_type: str) -> bool:
    """Whether the filesystem is smaller than its device: a clone or restore made larger."""
    size = filesystem_size(device, fs_type)
    return size is not None and device_size(device) - size >= GROW_THRESHOLD


def grow_unmounted_ext(device: str) -> None:
    """Grow an unmounted ext filesystem to its device: checked first, as resize2fs demands.

    Offline growth needs no CAP_SYS_RESOURCE (online growth does). e2fsck -p
    only makes the repairs that are always safe; anything more is left to a
    person, and the volume is not mounted.
    """
    # No timeout on either: killing e2fsck or an offline resize2fs half-way can
    # leave the filesystem damaged; a slow one holds this RPC, and the kubelet
    # waits (its own deadline only abandons the call, the work goes on).
    res = _run(["e2fsck", "-f", "-p", device], None)
    if res.returncode >= 4:  # 0: clean, 1/2: safely repaired; 4+: errors left
        raise FailedPrecondition(
            f"the filesystem on {device} has errors e2fsck -p will not repair "
            f"(exit {res.returncode}); check it by hand before using the volume"
        )
    _check(["resize2fs", device], f"resize2fs {device}", None)


def device_size(device: str) -> int:
    try:
        return linux.block_device_size(device)
    except OSError as exc:
        raise Unavailable(f"could not read the size of {device}: {exc.strerror or exc}") from exc
