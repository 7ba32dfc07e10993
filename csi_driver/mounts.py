"""Filesystems and mounts, over the kernel's mount table.

Probing (libblkid), sizing (BLKGETSIZE64), mounting and unmounting are
in-process calls (tessera.linux); only mkfs and the resize tools still run
as commands, each an argument list with a timeout. The mount table
(/proc/self/mountinfo) is the only record of what is mounted where: the
plugin keeps no state of its own, so a restart loses nothing.
"""

from __future__ import annotations

import errno
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tessera import linux
from tessera.errors import FailedPrecondition, Internal, InvalidArgument, Unavailable

TIMEOUT = 120
MKFS_TIMEOUT = 600


@dataclass(frozen=True)
class Mount:
    device: str  # major:minor of the mounted filesystem
    root: str  # path inside that filesystem (a bind mount of /dev/loop3 shows "/loop3")
    mountpoint: str
    options: frozenset[str]
    fs_type: str
    source: str

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


def _run(args: list[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise Unavailable(f"{args[0]} timed out after {timeout:.0f}s") from exc


def _check(args: list[str], what: str, timeout: float = TIMEOUT) -> None:
    res = _run(args, timeout)
    if res.returncode != 0:
        raise Internal(f"{what} failed: {res.stderr.strip() or res.stdout.strip()}")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040)."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        parts, tail = left.split(), right.split()
        mounts.append(
            Mount(
                device=parts[2],
                root=_unescape(parts[3]),
                mountpoint=_unescape(parts[4]),
                options=frozenset(parts[5].split(",")),
                fs_type=tail[0],
                source=_unescape(tail[1]) if len(tail) > 1 else "",
            )
        )
    return mounts


def mount_table() -> list[Mount]:
    return parse_mountinfo(Path("/proc/self/mountinfo").read_text())


def mounts_at(path: str) -> list[Mount]:
    """Every mount stacked on path, oldest first."""
    return [m for m in mount_table() if m.mountpoint == path]


def is_mount(path: str) -> bool:
    return bool(mounts_at(path))


def device_number(device: str) -> str:
    st = os.stat(device)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def uses_device(mount: Mount, device: str) -> bool:
    """True when the mount is the device's filesystem or a bind of its node."""
    real = os.path.realpath(device)
    if mount.fs_type == "devtmpfs":
        return mount.root == "/" + os.path.basename(real)
    try:
        return mount.device == device_number(real)
    except OSError:
        return False


def mounts_of_device(device: str) -> list[Mount]:
    return [m for m in mount_table() if uses_device(m, device)]


# ---- filesystems ---------------------------------------------------------------


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
            hint = ""
            if "Permission denied" in res.stderr:
                hint = " (online ext4 growth needs CAP_SYS_RESOURCE; give it to the plugin)"
            raise Internal(f"resize2fs {device} failed: {res.stderr.strip()}{hint}")
    else:
        raise FailedPrecondition(f"cannot grow a {fs_type} filesystem online")


def device_size(device: str) -> int:
    try:
        return linux.block_device_size(device)
    except OSError as exc:
        raise Unavailable(f"could not read the size of {device}: {exc.strerror or exc}") from exc


# ---- mounting ------------------------------------------------------------------------


def mount(source: str, target: str, fs_type: str, options: list[str]) -> None:
    """Mount a filesystem; options are mount(8)-style ("ro", "noatime", "discard", ...)."""
    what = f"mounting {source} on {target} ({fs_type}, {','.join(options) or 'defaults'})"
    try:
        flags, data = linux.parse_mount_options(options)
    except ValueError as exc:
        raise InvalidArgument(
            f"{what}: {exc}", field="volume_capability.mount.mount_flags"
        ) from exc
    # The device's own name, as mount(8) would record it in the mount table.
    device = os.path.realpath(source) if os.path.isabs(source) else source
    try:
        linux.mount(device, target, fs_type, flags, data)
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EINVAL:
            hint = f" (an option is not valid for {fs_type}, or {source} holds no {fs_type})"
        elif exc.errno in (errno.EACCES, errno.EROFS) and not flags & linux.MS_RDONLY:
            hint = " (the device is read-only; it can only be mounted with 'ro')"
        raise Internal(f"{what} failed: {exc.strerror}{hint}") from exc


def bind_mount(source: str, target: str, readonly: bool) -> None:
    """Bind source (a directory, or a device node onto a file) on target."""
    try:
        linux.mount(source, target, None, linux.MS_BIND, "")
    except OSError as exc:
        raise Internal(f"bind-mounting {source} on {target} failed: {exc.strerror}") from exc
    if readonly:
        # A bind mount ignores "ro" on the first call; it takes a remount,
        # which must repeat the nosuid/nodev/noexec the bind inherited.
        try:
            keep = linux.per_mount_flags(target)
            linux.mount(
                None, target, None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY | keep, ""
            )
        except OSError as exc:
            try:
                linux.umount(target)
            except OSError:
                pass  # the error worth reporting is the one below
            raise Internal(f"making {target} read-only failed: {exc.strerror}") from exc


def unmount(target: str) -> None:
    """Unmount every mount stacked on target; not mounted is fine.

    Never lazily (MNT_DETACH): a busy mount is reported, not hidden.
    """
    while is_mount(target):
        try:
            linux.umount(target)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT) and not is_mount(target):
                return  # someone else unmounted it meanwhile
            reason = "target is busy" if exc.errno == errno.EBUSY else exc.strerror
            raise FailedPrecondition(f"cannot unmount {target}: {reason}") from exc
