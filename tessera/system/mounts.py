"""Mounts, over the kernel's mount table.

Mounting and unmounting are in-process calls (`tessera.system.syscalls`).
The mount table (/proc/self/mountinfo) is the only record of what is
mounted where: nobody keeps state of their own, so a restart loses nothing.

Paths are compared by identity, not by spelling. The kernel follows
symlinks when it mounts and lists every mountpoint resolved, so a path
given under a symlinked directory (kubelet's root is one on some
distributions) is resolved with `canonical` before it is compared with the
table; every function here that takes a path does that itself. Only the
parent directories are resolved: the last component of a path is never
followed, so a staging or target path that is itself a symlink names the
link, and nothing is ever mounted, unmounted or removed where it points.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from tessera.errors import FailedPrecondition, Internal, InvalidArgument
from tessera.system import syscalls as linux


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


def canonical(path: str) -> str:
    """`path` as the mount table spells it: parents resolved, the last component as given.

    Symlinks and '//' in the parent directories are resolved (a parent that
    does not exist yet is resolved as far as it exists). The last component
    is never followed: a symlink there is the link itself, so a target that
    points somewhere else can never make us act on that somewhere else.
    '..' is not resolved specially; the callers' validation refuses it.
    """
    head, name = os.path.split(os.path.normpath(path))
    if not name:
        return os.path.realpath(head)
    return os.path.join(os.path.realpath(head), name)


def mount_point(path: str, field: str) -> str:
    """The canonical path to mount on; a path that is itself a symlink is refused.

    mount(2) follows a symlink at the target, so mounting "at" a link would
    put the mount wherever the link points: kubelet never hands out such a
    path, and we never follow one.
    """
    place = canonical(path)
    if os.path.islink(place):
        raise InvalidArgument(
            f"{field} {path} is a symlink (to {os.readlink(place)}); refusing to mount "
            "through it: give the directory itself",
            field=field,
        )
    return place


def mounts_at(path: str) -> list[Mount]:
    """Every mount stacked on path (resolved as `canonical` does), oldest first."""
    place = canonical(path)
    return [m for m in mount_table() if m.mountpoint == place]


def is_mount(path: str) -> bool:
    return bool(mounts_at(path))


def mount_of_device(path: str, device: str) -> Mount | None:
    """The top mount at path when it is the device's filesystem or a bind of its node."""
    here = mounts_at(path)
    if here and uses_device(here[-1], device):
        return here[-1]
    return None


# Filesystems whose mountpoints are never stat()ed when looking for binds of a
# device node: a dead server or FUSE daemon would hang the caller, and no
# device node of ours is bound from them.
_REMOTE_OR_USERSPACE = ("fuse", "nfs", "cifs", "smb", "ceph", "9p", "glusterfs", "afs", "sshfs")


def binds_node(mount: Mount, rdev: int, name: str) -> bool:
    """True when the mount is a bind of a block device node with device number rdev.

    Decided by number, never by name or filesystem type: the mount table
    shows such a bind with the device number of the filesystem the node
    lives on (devtmpfs, or a container's tmpfs /dev) and the node's path
    there as root, which may be any name. So the mountpoint is stat()ed.
    `name` (the kernel's, "loop3") is only the fallback for a devtmpfs bind
    whose mountpoint we cannot see any more (deleted, outside our root).
    """
    if mount.root == "/" or mount.fs_type.startswith(_REMOTE_OR_USERSPACE):
        return False  # a filesystem's root is a directory, never a device node
    try:
        st = os.stat(mount.mountpoint)
    except OSError:
        return mount.fs_type == "devtmpfs" and mount.root == "/" + name
    return stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev


def binds_device(mount: Mount, device: str) -> bool:
    """True when the mount is a bind of the device's node (a block publish), not its filesystem."""
    return any(binds_node(mount, rdev, name) for rdev, name in _numbers([device]))


def uses_device(mount: Mount, device: str) -> bool:
    """True when the mount is the device's filesystem or a bind of its node."""
    return any(_uses(mount, rdev, name) for rdev, name in _numbers([device]))


def _uses(mount: Mount, rdev: int, name: str) -> bool:
    if mount.device == f"{os.major(rdev)}:{os.minor(rdev)}":
        return True  # its filesystem
    return binds_node(mount, rdev, name)


def _numbers(devices: list[str]) -> list[tuple[int, str]]:
    """(st_rdev, kernel name) of each block device that exists: stat()ed once per table walk."""
    found = []
    for device in devices:
        try:
            st = os.stat(device)
        except OSError:
            continue  # a device that is gone is used by nothing
        if stat.S_ISBLK(st.st_mode):
            found.append((st.st_rdev, os.path.basename(os.path.realpath(device))))
    return found


def mounts_of_device(device: str) -> list[Mount]:
    numbers = _numbers([device])
    return [m for m in mount_table() if any(_uses(m, r, n) for r, n in numbers)]


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
    target = mount_point(target, "target")
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
    target = mount_point(target, "target")
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

    Never lazily (MNT_DETACH): a busy mount is reported, not hidden. The
    path is resolved first (`canonical`), so a mount under a symlinked
    directory is found, and a target that is a symlink is never followed.
    """
    target = canonical(target)
    while is_mount(target):
        try:
            linux.umount(target)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT) and not is_mount(target):
                return  # someone else unmounted it meanwhile
            reason = "target is busy" if exc.errno == errno.EBUSY else exc.strerror
            raise FailedPrecondition(f"cannot unmount {target}: {reason}") from exc


def mounts_of_devices(devices: list[str]) -> list[str]:
    """Mountpoints using any of these block devices, in mount order."""
    numbers = _numbers(devices)
    return [m.mountpoint for m in mount_table() if any(_uses(m, r, n) for r, n in numbers)]


def mounts_under(prefix: Path) -> list[str]:
    """Mountpoints at or below prefix (what a test or `dev up` must not leak)."""
    root = str(prefix.resolve())
    return [
        m.mountpoint
        for m in mount_table()
        if m.mountpoint == root or m.mountpoint.startswith(root + os.sep)
    ]
