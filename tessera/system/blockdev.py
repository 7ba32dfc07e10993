"""Facts about block devices: their size, and who is using them.

`holders` is the one answer to "may this device be released or handed to
another volume?", for the agent (detach, views, attach) and the CSI node
service ("still published"). It looks at every kind of reference the
kernel lets us see, because a stale one is how another volume's data ends
up in a pod: a target still bound to /dev/loop3 reads whatever loop3 is
bound to next.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from tessera.system import mounts

SECTOR = 512
SYS_BLOCK = Path("/sys/class/block")


def size_bytes(device: str) -> int:
    """The device's current size as the kernel sees it (sysfs counts 512-byte sectors)."""
    return int((SYS_BLOCK / kernel_name(device) / "size").read_text().strip()) * SECTOR


def kernel_name(device: str) -> str:
    """`/dev/tessera/<id>` or `/dev/loop3` -> `loop3` (the name under /sys/class/block)."""
    return os.path.basename(os.path.realpath(device))


def holders(device: str, ignore_mountpoints: Iterable[str] = ()) -> list[str]:
    """Everything using the block device, human-readable; empty when nothing is seen.

    - mounts of its filesystem (the mount's device number is the device's);
    - bind mounts of its device node anywhere in the mount table: the table
      shows such a mount with the device number of the filesystem the node
      lives on and the node's path as root, so a bind is told by number
      (`mounts.binds_node`: /dev/loop3 bound from a container's tmpfs /dev
      under another name is still loop3);
    - holders in sysfs (dm, md, a partition table in use);
    - loop devices stacked on it (kubelet keeps one on each block volume);
    - an exclusive opener (O_EXCL answers EBUSY), when nothing above
      explains it: a mount in another mount namespace, mkfs, a database.

    `ignore_mountpoints` are mountpoints the caller expects (its own staging
    mount), spelled as the mount table spells them (resolved: `mounts.canonical`).
    A device that does not exist has no holders.
    """
    try:
        rdev = os.stat(device).st_rdev
    except FileNotFoundError:
        return []
    name = kernel_name(device)
    ignored = set(ignore_mountpoints)
    in_table, found = _mount_holders(rdev, name, ignored)
    found += _sysfs_holders(name) + _stacked_loops(rdev, name)
    if not in_table and not found and _opened_exclusively(device):
        found.append(
            f"an exclusive opener of {device} (a mount in another mount namespace, or a "
            "program holding it open with O_EXCL)"
        )
    return found


def _mount_holders(rdev: int, name: str, ignored: set[str]) -> tuple[bool, list[str]]:
    """(whether any mount of the device was seen, the ones not ignored, described)."""
    number = f"{os.major(rdev)}:{os.minor(rdev)}"
    seen, found = False, []
    for m in mounts.mount_table():
        if m.device == number:
            what = f"its filesystem is mounted at {m.mountpoint}"
        elif mounts.binds_node(m, rdev, name):
            what = f"its device node is bind-mounted at {m.mountpoint}"
        else:
            continue
        seen = True
        if m.mountpoint not in ignored:
            found.append(what)
    return seen, found


def _sysfs_holders(name: str) -> list[str]:
    try:
        entries = sorted(os.listdir(SYS_BLOCK / name / "holders"))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [f"it is held by {holder} (/sys/class/block/{name}/holders)" for holder in entries]


def _stacked_loops(rdev: int, name: str) -> list[str]:
    """Loop devices whose backing file is this device's node (by device number)."""
    found = []
    for entry in sorted(os.listdir(SYS_BLOCK)):
        if not entry.startswith("loop") or entry == name:
            continue
        try:
            backing = _read_sysfs(os.path.join(SYS_BLOCK, entry, "loop", "backing_file"))
            st = os.stat(backing)
        except OSError:
            continue  # not a bound loop device, or its backing is not ours to see
        if stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev:
            found.append(f"loop device /dev/{entry} is stacked on it (backing file {backing})")
    return found


def _read_sysfs(path: str) -> str:
    """One small sysfs attribute (a raw read: this runs for every loop device)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.fsdecode(os.read(fd, 4096)).removesuffix("\n")
    finally:
        os.close(fd)


def _opened_exclusively(device: str) -> bool:
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as exc:
        return exc.errno == errno.EBUSY
    os.close(fd)
    return False
