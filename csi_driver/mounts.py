"""Filesystems and mounts, over util-linux and the kernel's mount table.

Every command is an argument list with a timeout. The mount table
(/proc/self/mountinfo) is the only record of what is mounted where: the
plugin keeps no state of its own, so a restart loses nothing.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

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
    guess would destroy data.
    """
    res = _run(["blkid", "-p", "-o", "export", device])
    if res.returncode == 2:
        return None
    if res.returncode != 0:
        raise Unavailable(f"could not probe {device} for a filesystem: {res.stderr.strip()}")
    fields = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    if "TYPE" in fields:
        return fields["TYPE"]
    if "PTTYPE" in fields:
        return f"partition table ({fields['PTTYPE']})"
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
    res = _run(["blockdev", "--getsize64", device])
    if res.returncode != 0:
        raise Unavailable(f"could not read the size of {device}: {res.stderr.strip()}")
    return int(res.stdout.strip())


# ---- mounting ------------------------------------------------------------------------


def mount(source: str, target: str, fs_type: str, options: list[str]) -> None:
    args = ["mount", "-t", fs_type]
    if options:
        args += ["-o", ",".join(options)]
    _check([*args, source, target], f"mounting {source} on {target}")


def bind_mount(source: str, target: str, readonly: bool) -> None:
    _check(["mount", "--bind", source, target], f"bind-mounting {source} on {target}")
    if readonly:
        # A bind mount ignores "ro" on the first call; it takes a remount.
        res = _run(["mount", "-o", "remount,bind,ro", target])
        if res.returncode != 0:
            _run(["umount", target])
            raise Internal(f"making {target} read-only failed: {res.stderr.strip()}")


def unmount(target: str) -> None:
    """Unmount every mount stacked on target; not mounted is fine."""
    while is_mount(target):
        res = _run(["umount", target])
        if res.returncode != 0:
            raise FailedPrecondition(f"cannot unmount {target}: {res.stderr.strip()}")
