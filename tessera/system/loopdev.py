"""Loop devices through the kernel's own interface: ioctls and sysfs, no losetup.

Attaching is on the NodeStageVolume path, where each util-linux process
costs 5-10 ms, more than the work itself. What losetup does is a handful of
system calls (`<linux/loop.h>`), so they are made here directly:

- attach: `LOOP_CTL_GET_FREE` on /dev/loop-control, then `LOOP_CONFIGURE`
  (one call: backing file, flags, name; Linux >= 5.8). Older kernels get
  `LOOP_SET_FD` + `LOOP_SET_STATUS64` + `LOOP_SET_DIRECT_IO`, as losetup does.
- detach: `LOOP_CLR_FD`; resize: `LOOP_SET_CAPACITY`.
- what is bound to what: /sys/class/block/loopN/loop/backing_file, which
  exists only while the device is bound (losetup reads the same file).
- a label: `lo_file_name` in the device's status is informational to the
  kernel; the agent writes the backing path there, or a label of its own
  (read-only views), and reads it back after a restart with `read_label`.

A free device that something still references (a stale bind mount of its
node, see `blockdev.holders`) is never bound: whoever holds that reference
would read the next volume's data. Another device is taken instead.

Devices are never configured with LO_FLAGS_AUTOCLEAR: they must outlive the
agent process, so a restarted agent finds them again by backing file.
Every file descriptor is closed before returning; a bound device without
autoclear stays bound after its last close.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tessera.system import blockdev

log = logging.getLogger(__name__)

# <linux/loop.h>
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_SET_CAPACITY = 0x4C07
LOOP_SET_DIRECT_IO = 0x4C08
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_ADD = 0x4C80
LOOP_CTL_GET_FREE = 0x4C82

LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16

LO_NAME_SIZE = 64
LOOP_CONTROL = "/dev/loop-control"
DELETED = " (deleted)"

# How often to ask for another free device when someone else (losetup, another
# agent) configured the one we were given first. Each round is a few µs.
BUSY_RETRIES = 32
# How long detach waits for a device that another opener (udev's blkid probe)
# still holds; the kernel clears it on that opener's last close.
UNBIND_WAIT = 2.0
UNBIND_STEP = 0.005


class LoopInfo64(ctypes.Structure):
    """`struct loop_info64`: 232 bytes on every architecture (only fixed-size fields)."""

    _fields_ = [
        ("lo_device", ctypes.c_uint64),
        ("lo_inode", ctypes.c_uint64),
        ("lo_rdevice", ctypes.c_uint64),
        ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64),
        ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32),
        ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32),
        ("lo_file_name", ctypes.c_uint8 * LO_NAME_SIZE),
        ("lo_crypt_name", ctypes.c_uint8 * LO_NAME_SIZE),
        ("lo_encrypt_key", ctypes.c_uint8 * 32),
        ("lo_init", ctypes.c_uint64 * 2),
    ]


class LoopConfig(ctypes.Structure):
    """`struct loop_config` for LOOP_CONFIGURE: 304 bytes."""

    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("block_size", ctypes.c_uint32),
        ("info", LoopInfo64),
        ("reserved", ctypes.c_uint64 * 8),
    ]


# The one entry point to the kernel, so a test can make a single request fail
# (e.g. LOOP_CONFIGURE, to exercise the pre-5.8 path on a new kernel).
_ioctl: Callable[..., Any] = fcntl.ioctl


class LoopBusy(OSError):
    """The free device we were given was configured by someone else first (EBUSY)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EBUSY, message)


@dataclass(frozen=True)
class Bound:
    """A bound loop device as sysfs shows it."""

    path: str
    backing: str
    readonly: bool
    direct_io: bool


def device_path(number: int) -> str:
    return f"/dev/loop{number}"


def number_of(device: str) -> int:
    """`/dev/loop7` -> 7 (the caller has checked the name)."""
    return int(os.path.basename(device).removeprefix("loop"))


@contextmanager
def _opened(path: str, flags: int) -> Iterator[int]:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


# ---- sysfs -------------------------------------------------------------------


def _sys(number: int, *parts: str) -> str:
    return os.path.join(str(blockdev.SYS_BLOCK), f"loop{number}", *parts)


def backing_file(number: int) -> str | None:
    """The backing file of loopN, or None when it is not bound (or does not exist)."""
    try:
        with open(
            _sys(number, "loop", "backing_file"), encoding="utf-8", errors="surrogateescape"
        ) as f:
            text = f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:  # unbound between listing and reading
        if exc.errno in (errno.ENXIO, errno.ENODEV):
            return None
        raise
    return text.removesuffix("\n").removesuffix(DELETED) or None


def _flag(number: int, *parts: str) -> bool:
    try:
        with open(_sys(number, *parts), encoding="ascii") as f:
            return f.read().strip() == "1"
    except FileNotFoundError:
        return False


def bound_devices() -> list[Bound]:
    """Every bound loop device, by device number."""
    numbers = []
    for name in os.listdir(blockdev.SYS_BLOCK):
        suffix = name.removeprefix("loop")
        if name.startswith("loop") and suffix.isdigit():
            numbers.append(int(suffix))
    found = []
    for n in sorted(numbers):
        backing = backing_file(n)
        if backing is not None:
            found.append(Bound(device_path(n), backing, _flag(n, "ro"), _flag(n, "loop", "dio")))
    return found


# ---- attach --------------------------------------------------------------------


def bound_under(prefix: str | os.PathLike[str]) -> list[Bound]:
    """Every loop device whose backing file is prefix or below it."""
    root = os.path.realpath(prefix)
    return [b for b in bound_devices() if b.backing == root or b.backing.startswith(root + os.sep)]


def attach(
    volume_file: str, *, readonly: bool, direct_io: bool, label: str = ""
) -> tuple[str, bool]:
    """Bind the file to a free loop device; (device, whether direct I/O is on).

    `label` goes into the device's lo_file_name (default: the file's path).

    Direct I/O is requested with LO_FLAGS_DIRECT_IO, as losetup --direct-io=on
    does. A backing filesystem that cannot do it gets a buffered device: the
    kernel either drops the flag (read back here) or refuses with EINVAL
    (asked again without it).
    Callers serialize attaches within the process; another process taking
    the free device we were given (EBUSY) is answered by asking for another.
    """
    name = label or volume_file
    referenced: set[int] = set()
    with _opened(volume_file, os.O_RDONLY if readonly else os.O_RDWR) as file_fd:
        for _ in range(BUSY_RETRIES):
            number = _free_number(referenced)
            device = device_path(number)
            held = blockdev.holders(device)
            if held:
                log.warning("not using free %s: %s", device, "; ".join(held))
                referenced.add(number)
                continue
            try:
                with _open_node(device) as loop_fd:
                    return device, _configure(loop_fd, file_fd, name, readonly, direct_io)
            except LoopBusy:
                log.debug("%s was taken by another process; asking for another", device)
    raise LoopBusy(f"no usable free loop device after {BUSY_RETRIES} attempts")


def _free_number(referenced: set[int]) -> int:
    """The kernel's lowest free device, or the next free one past those still referenced.

    LOOP_CTL_GET_FREE always names the lowest free device, so once that one
    is refused the search goes on by number; a number with no device yet is
    created with LOOP_CTL_ADD (EEXIST: someone else just did).
    """
    with _opened(LOOP_CONTROL, os.O_RDWR) as control:
        number = _ioctl(control, LOOP_CTL_GET_FREE)
        if number not in referenced:
            return number
        candidate = max(referenced) + 1
        while candidate in referenced or backing_file(candidate) is not None:
            candidate += 1
        if not os.path.exists(_sys(candidate)):
            try:
                _ioctl(control, LOOP_CTL_ADD, candidate)
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise
        return candidate


@contextmanager
def _open_node(device: str) -> Iterator[int]:
    """The device node, waiting for it only when it is not there yet.

    devtmpfs makes the node as the kernel adds the device, so the wait is
    only for hosts where udev alone makes nodes.
    """
    if not os.path.exists(device):
        from tessera.system.udev import wait_for_device

        wait_for_device(device)
    with _opened(device, os.O_RDWR) as fd:
        yield fd


def _info(label: str, flags: int) -> LoopInfo64:
    info = LoopInfo64()
    info.lo_flags = flags
    # Informational to the kernel (backing_file is the real path), ours to
    # read back with `label`; the kernel keeps 63 bytes and a NUL.
    name = os.fsencode(label)[: LO_NAME_SIZE - 1]
    ctypes.memmove(info.lo_file_name, name, len(name))
    return info


def read_label(device: str) -> str:
    """What `attach` wrote into the device's lo_file_name ("" when it is not bound)."""
    info = LoopInfo64()
    try:
        with _opened(device, os.O_RDONLY) as fd:
            _ioctl(fd, LOOP_GET_STATUS64, info)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.ENOENT):
            return ""
        raise
    return os.fsdecode(bytes(info.lo_file_name).split(b"\0", 1)[0])


def _configure(loop_fd: int, file_fd: int, volume_file: str, readonly: bool, dio: bool) -> bool:
    """LOOP_CONFIGURE; the pre-5.8 sequence when the kernel does not know it.

    Kernels before 5.8 answer an unknown loop ioctl with EINVAL (or ENOTTY),
    and EINVAL can also mean "no direct I/O here": asking again without
    direct I/O tells the two apart.
    """
    flags = LO_FLAGS_READ_ONLY if readonly else 0
    try:
        _loop_configure(loop_fd, file_fd, volume_file, flags | (LO_FLAGS_DIRECT_IO if dio else 0))
    except LoopBusy:
        raise
    except OSError as exc:
        first = exc
    else:
        return _direct_io_on(loop_fd)
    if first.errno == errno.EINVAL and dio:
        try:
            _loop_configure(loop_fd, file_fd, volume_file, flags)
        except OSError as exc:
            if exc.errno not in (errno.ENOTTY, errno.EINVAL):
                raise
        else:
            log.info("direct I/O refused for %s (%s); attached buffered", volume_file, first)
            return False
    elif first.errno not in (errno.ENOTTY, errno.EINVAL):
        raise first
    log.debug("LOOP_CONFIGURE unavailable (%s); using LOOP_SET_FD", first)
    return _configure_legacy(loop_fd, file_fd, volume_file, dio)


def _loop_configure(loop_fd: int, file_fd: int, volume_file: str, flags: int) -> None:
    block_size = _backing_sector_size(file_fd)
    config = LoopConfig(fd=file_fd, block_size=block_size, info=_info(volume_file, flags))
    _bind(loop_fd, LOOP_CONFIGURE, config)


def _backing_sector_size(file_fd: int) -> int:
    """The logical block size of the device under the pool's filesystem (0: kernel default).

    With block_size 0 and direct I/O, the kernel (6.11+) gives the loop device
    the FILE's direct-I/O alignment, and XFS reports the filesystem block size
    (4096) for a reflinked file: after its first snapshot a volume, and every
    clone of it, would come back with 4096-byte sectors, and a filesystem made
    with 1 KiB blocks on the 512-byte device no longer mounts ("bad block
    size"). The pool's own sector size keeps one geometry for a volume's life;
    where the file's alignment is larger the kernel attaches it buffered.
    """
    try:
        st = os.fstat(file_fd)
    except OSError:
        return 0
    dev = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    for queue in (f"{dev}/queue", f"{dev}/../queue"):  # a partition's queue is its disk's
        try:
            with open(f"{queue}/logical_block_size") as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            continue
    return 0  # no block device under it (tmpfs, btrfs subvolume): the kernel decides


def _bind(loop_fd: int, request: int, arg: object) -> None:
    """A binding ioctl; EBUSY (someone bound the device first) becomes LoopBusy."""
    try:
        _ioctl(loop_fd, request, arg)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise LoopBusy(str(exc)) from exc
        raise


def _configure_legacy(loop_fd: int, file_fd: int, volume_file: str, dio: bool) -> bool:
    """LOOP_SET_FD + LOOP_SET_STATUS64 (+ LOOP_SET_DIRECT_IO), as losetup does before 5.8.

    Read-only follows from the backing file being opened O_RDONLY. A failure
    after LOOP_SET_FD unbinds the device again, so nothing half-made is left.
    """
    _bind(loop_fd, LOOP_SET_FD, file_fd)
    try:
        _ioctl(loop_fd, LOOP_SET_STATUS64, _info(volume_file, 0))
        if dio:
            try:
                _ioctl(loop_fd, LOOP_SET_DIRECT_IO, 1)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                log.info("direct I/O refused for %s (%s); attached buffered", volume_file, exc)
    except OSError:
        _clear_quietly(loop_fd)
        raise
    return _direct_io_on(loop_fd)


def _clear_quietly(loop_fd: int) -> None:
    try:
        _ioctl(loop_fd, LOOP_CLR_FD)
    except OSError as exc:
        log.warning("could not unbind a half-configured loop device: %s", exc)


def backing_identity(device: str) -> tuple[int, int]:
    """(st_dev, st_ino) of the file the device is bound to, as the kernel holds it.

    A path can be renamed or deleted and replaced while a device stays bound
    to the old file; this is what the device really reads.
    """
    info = LoopInfo64()
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _ioctl(fd, LOOP_GET_STATUS64, info)
    finally:
        os.close(fd)
    return info.lo_device, info.lo_inode


def _direct_io_on(loop_fd: int) -> bool:
    """What the kernel made of the request (it may drop direct I/O silently).

    Only informational, so a failure here must not fail (and leak) an attach
    that already happened.
    """
    info = LoopInfo64()
    try:
        _ioctl(loop_fd, LOOP_GET_STATUS64, info)
    except OSError as exc:
        log.warning("could not read back the loop device's flags: %s", exc)
        return False
    return bool(info.lo_flags & LO_FLAGS_DIRECT_IO)


# ---- detach / resize -------------------------------------------------------------


def detach(device: str) -> bool:
    """Unbind the device; True once it is unbound (False: cleared on a holder's last close).

    LOOP_CLR_FD on a device only we hold clears it when our descriptor is
    closed. If something else still holds it (udev probing after the change
    event), the kernel marks it autoclear and clears it on that last close;
    wait a little for that so callers see the device gone. Not bound
    (ENXIO) or no such device is success: detach is idempotent.
    """
    number = number_of(device)
    before = backing_file(number)
    try:
        with _opened(device, os.O_RDONLY) as loop_fd:
            _ioctl(loop_fd, LOOP_CLR_FD)
    except FileNotFoundError:
        return True
    except OSError as exc:
        # ENXIO: not bound. Any other failure only counts while it is still
        # bound (EBUSY from old kernels): unbound is what the caller wants.
        if exc.errno == errno.ENXIO or backing_file(number) is None:
            return True
        raise
    deadline = time.monotonic() + UNBIND_WAIT
    # Compare with what was bound: another attach may reuse the number at once.
    while before is not None and backing_file(number) == before:
        if time.monotonic() >= deadline:
            return False
        time.sleep(UNBIND_STEP)
    return True


def set_capacity(device: str) -> None:
    """Make the device pick up its backing file's new size."""
    with _opened(device, os.O_RDONLY) as loop_fd:
        _ioctl(loop_fd, LOOP_SET_CAPACITY, 0)
