"""Linux system calls and libblkid, called in-process through ctypes.

Why not the util-linux commands: staging and publishing a volume used to run
blkid, blockdev, mount (three times) and umount, and every one of those
processes costs 5-10 ms to start, several times what the work itself costs.
These wrappers do the same work without a fork.

This module only translates: C calls become Python calls, a failing call
becomes an OSError carrying errno (a missing path is FileNotFoundError, a busy
target OSError(EBUSY), and so on). Which error a caller reports, and with what
message, is the caller's policy (see tessera/system/mounts.py and filesystems.py).

The shared libraries are loaded on first use and kept for the life of the
process; both are part of a base Debian system (libc6, and util-linux's
libblkid1, Priority: required).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import os
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tessera.errors import Internal

# ---- mount(2) flags (linux/mount.h) -------------------------------------------------

MS_RDONLY = 1
MS_NOSUID = 1 << 1
MS_NODEV = 1 << 2
MS_NOEXEC = 1 << 3
MS_SYNCHRONOUS = 1 << 4
MS_REMOUNT = 1 << 5
MS_MANDLOCK = 1 << 6
MS_DIRSYNC = 1 << 7
MS_NOSYMFOLLOW = 1 << 8
MS_NOATIME = 1 << 10
MS_NODIRATIME = 1 << 11
MS_BIND = 1 << 12
MS_SILENT = 1 << 15
MS_RELATIME = 1 << 21
MS_I_VERSION = 1 << 23
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

#: The mount(8) options that are flags, not filesystem data: name -> (bit, set it?).
#: The same table as libmount's linux_flags_map, for the options that make sense
#: on a new mount; "rw" after "ro" clears the bit again, as with mount(8).
FLAG_OPTIONS: dict[str, tuple[int, bool]] = {
    "ro": (MS_RDONLY, True),
    "rw": (MS_RDONLY, False),
    "nosuid": (MS_NOSUID, True),
    "suid": (MS_NOSUID, False),
    "nodev": (MS_NODEV, True),
    "dev": (MS_NODEV, False),
    "noexec": (MS_NOEXEC, True),
    "exec": (MS_NOEXEC, False),
    "sync": (MS_SYNCHRONOUS, True),
    "async": (MS_SYNCHRONOUS, False),
    "dirsync": (MS_DIRSYNC, True),
    "mand": (MS_MANDLOCK, True),
    "nomand": (MS_MANDLOCK, False),
    "noatime": (MS_NOATIME, True),
    "atime": (MS_NOATIME, False),
    "nodiratime": (MS_NODIRATIME, True),
    "diratime": (MS_NODIRATIME, False),
    "relatime": (MS_RELATIME, True),
    "norelatime": (MS_RELATIME, False),
    "strictatime": (MS_STRICTATIME, True),
    "nostrictatime": (MS_STRICTATIME, False),
    "lazytime": (MS_LAZYTIME, True),
    "nolazytime": (MS_LAZYTIME, False),
    "iversion": (MS_I_VERSION, True),
    "noiversion": (MS_I_VERSION, False),
    "nosymfollow": (MS_NOSYMFOLLOW, True),
    "symfollow": (MS_NOSYMFOLLOW, False),
    "silent": (MS_SILENT, True),
    "loud": (MS_SILENT, False),
}

#: Options mount(8) consumes itself and never hands to the kernel (fstab and
#: helper bookkeeping); "defaults" means rw,suid,dev,exec,async: the kernel's defaults.
USERSPACE_OPTIONS = frozenset({"defaults", "auto", "noauto", "nofail", "_netdev", "nouser"})
USERSPACE_PREFIXES = ("x-", "comment=")

#: Options that are separate operations in mount(8) (a bind, a remount, a
#: propagation change, a loop setup), not something one mount(2) call can honour.
OPERATION_OPTIONS = frozenset(
    {
        "bind",
        "rbind",
        "remount",
        "move",
        "loop",
        "shared",
        "rshared",
        "slave",
        "rslave",
        "private",
        "rprivate",
        "unbindable",
        "runbindable",
        "make-shared",
        "make-private",
        "make-slave",
        "make-unbindable",
    }
)


def split_options(options: Iterable[str]) -> list[str]:
    """Each option on its own: "a,b" is two options, as it is to mount(8).

    A comma inside double quotes belongs to the value, as in an SELinux
    context="system_u:object_r:container_file_t:s0:c1,c2" that kubelet passes.
    """
    out: list[str] = []
    for option in options:
        current, quoted = [], False
        for ch in option:
            if ch == '"':
                quoted = not quoted
            if ch == "," and not quoted:
                out.append("".join(current))
                current = []
            else:
                current.append(ch)
        out.append("".join(current))
    return [o.strip() for o in out if o.strip()]


def parse_mount_options(options: Iterable[str]) -> tuple[int, str]:
    """mount(8)-style options -> (MS_* flags, the filesystem's data string).

    Flag options become bits (the last of "ro"/"rw" wins); options mount(8)
    keeps to itself are dropped; everything else ("discard", "nouuid",
    "data=ordered", ...) is filesystem data, passed on in order for the
    filesystem to accept or refuse (EINVAL). Raises ValueError naming the
    options that ask for a bind, remount, propagation change or loop setup.
    """
    flags, data, refused = 0, [], []
    for option in split_options(options):
        if option in FLAG_OPTIONS:
            bit, on = FLAG_OPTIONS[option]
            flags = flags | bit if on else flags & ~bit
        elif option in USERSPACE_OPTIONS or option.startswith(USERSPACE_PREFIXES):
            continue
        elif option in OPERATION_OPTIONS:
            refused.append(option)
        else:
            data.append(option)
    if refused:
        raise ValueError(
            f"mount option(s) {', '.join(refused)} ask for a separate mount operation, "
            "not a filesystem mount"
        )
    return flags, ",".join(data)


# ---- libc: mount(2), umount2(2) ------------------------------------------------------

_load_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL] = {}


def _load(name: str, setup: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL:
    """dlopen a library once per process and declare its prototypes.

    Without argtypes/restype ctypes would pass and return C ints, truncating
    64-bit pointers; a library that is missing or lacks a symbol is Internal
    (the node is not set up as documented), not something a retry fixes.
    """
    lib = _libs.get(name)
    if lib is not None:
        return lib
    with _load_lock:
        lib = _libs.get(name)
        if lib is None:
            try:
                lib = ctypes.CDLL(name, use_errno=True)
                setup(lib)
            except (OSError, AttributeError) as exc:
                raise Internal(f"cannot load {name}: {exc}") from exc
            _libs[name] = lib
    return lib


def _setup_libc(lib: ctypes.CDLL) -> None:
    # int mount(const char *source, const char *target, const char *fstype,
    #           unsigned long flags, const void *data)
    lib.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_char_p,
    ]
    lib.mount.restype = ctypes.c_int
    # int umount2(const char *target, int flags)
    lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.umount2.restype = ctypes.c_int
    # int statfs(const char *path, struct statfs *buf)
    lib.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    lib.statfs.restype = ctypes.c_int


def _libc() -> ctypes.CDLL:
    return _load("libc.so.6", _setup_libc)


def _oserror(filename: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, os.strerror(err), filename)


def _path(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


#: statfs(2) f_type of the filesystems whose st_blocks counts every block a
#: file holds, delayed allocations included, the moment fsync returns.
EXT4_SUPER_MAGIC = 0xEF53
XFS_SUPER_MAGIC = 0x58465342
BTRFS_SUPER_MAGIC = 0x9123683E
TMPFS_MAGIC = 0x01021994
BLOCK_COUNTING_FILESYSTEMS = frozenset(
    {EXT4_SUPER_MAGIC, XFS_SUPER_MAGIC, BTRFS_SUPER_MAGIC, TMPFS_MAGIC}
)


def filesystem_magic(path: str) -> int:
    """statfs(2)'s f_type for the filesystem holding path (its first field, a long)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _libc().statfs(_path(path), buf) != 0:
        raise _oserror(path)
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF


def mount(source: str | None, target: str, fs_type: str | None, flags: int, data: str) -> None:
    """mount(2). Raises OSError with the kernel's errno (EINVAL for an option
    the filesystem refuses, EBUSY, EACCES for a read-only device, ...)."""
    rc = _libc().mount(
        _path(source), _path(target), _path(fs_type), flags, data.encode() if data else None
    )
    if rc != 0:
        raise _oserror(target)


#: umount2(2): do not follow a symlink at the target (linux/fs.h)
UMOUNT_NOFOLLOW = 8


def umount(target: str) -> None:
    """umount2(2), never MNT_DETACH, whose lazy unmount would hide a busy mount
    instead of reporting it. UMOUNT_NOFOLLOW: a target swapped for a symlink
    never unmounts where the link points. EINVAL means not a mount point."""
    if _libc().umount2(os.fsencode(target), UMOUNT_NOFOLLOW) != 0:
        raise _oserror(target)


#: statvfs f_flag bits (ST_*) of the per-mount flags a bind remount must repeat.
_ST_TO_MS = {
    os.ST_NOSUID: MS_NOSUID,
    os.ST_NODEV: MS_NODEV,
    os.ST_NOEXEC: MS_NOEXEC,
    8192: MS_NOSYMFOLLOW,  # ST_NOSYMFOLLOW; the os module does not name it
}


def per_mount_flags(target: str) -> int:
    """The nosuid/nodev/noexec/nosymfollow flags target's mount has now, as MS_* bits.

    A MS_REMOUNT|MS_BIND call replaces a mount's flags with the ones it is
    given (atime flags excepted), so a remount that only says MS_RDONLY
    would quietly drop nosuid or noexec; mount(8) repeats them too.
    """
    have = os.statvfs(target).f_flag
    flags = 0
    for st, ms in _ST_TO_MS.items():
        if have & st:
            flags |= ms
    return flags


# ---- BLKGETSIZE64 ----------------------------------------------------------------------

BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t)


def block_device_size(device: str) -> int:
    """A block device's size in bytes, from the BLKGETSIZE64 ioctl (what
    `blockdev --getsize64` does). ENOTTY for something that is not a block device."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        return block_device_size_fd(fd)
    finally:
        os.close(fd)


def block_device_size_fd(fd: int) -> int:
    buf = fcntl.ioctl(fd, BLKGETSIZE64, bytes(8))
    return int(struct.unpack("=Q", buf)[0])


# ---- libblkid ------------------------------------------------------------------------

# blkid.h superblock chain flags
BLKID_SUBLKS_TYPE = 1 << 5
BLKID_SUBLKS_BADCSUM = 1 << 10


def _setup_blkid(lib: ctypes.CDLL) -> None:
    p = ctypes.c_void_p
    # blkid_probe blkid_new_probe_from_filename(const char *filename): NULL + errno on failure
    lib.blkid_new_probe_from_filename.argtypes = [ctypes.c_char_p]
    lib.blkid_new_probe_from_filename.restype = p
    # int blkid_probe_enable_superblocks(blkid_probe pr, int enable)
    lib.blkid_probe_enable_superblocks.argtypes = [p, ctypes.c_int]
    lib.blkid_probe_enable_superblocks.restype = ctypes.c_int
    # int blkid_probe_set_superblocks_flags(blkid_probe pr, int flags)
    lib.blkid_probe_set_superblocks_flags.argtypes = [p, ctypes.c_int]
    lib.blkid_probe_set_superblocks_flags.restype = ctypes.c_int
    # int blkid_probe_enable_partitions(blkid_probe pr, int enable)
    lib.blkid_probe_enable_partitions.argtypes = [p, ctypes.c_int]
    lib.blkid_probe_enable_partitions.restype = ctypes.c_int
    # int blkid_do_safeprobe(blkid_probe pr): 0 found, 1 nothing, -2 ambivalent, -1 error
    lib.blkid_do_safeprobe.argtypes = [p]
    lib.blkid_do_safeprobe.restype = ctypes.c_int
    # int blkid_probe_lookup_value(blkid_probe pr, const char *name,
    #                              const char **data, size_t *len)
    lib.blkid_probe_lookup_value.argtypes = [
        p,
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.c_char_p),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    lib.blkid_probe_lookup_value.restype = ctypes.c_int
    # void blkid_free_probe(blkid_probe pr)
    lib.blkid_free_probe.argtypes = [p]
    lib.blkid_free_probe.restype = None


def _blkid() -> ctypes.CDLL:
    return _load("libblkid.so.1", _setup_blkid)


class ProbeStatus(enum.Enum):
    FOUND = "found"
    BLANK = "blank"
    AMBIVALENT = "ambivalent"


@dataclass(frozen=True)
class Probe:
    """What libblkid found: TYPE for a filesystem (or RAID member, swap, ...),
    PTTYPE for a partition table; neither when BLANK or AMBIVALENT."""

    status: ProbeStatus
    type: str | None = None
    pttype: str | None = None


#: Where signatures live: libblkid's probers read ~30 scattered pages in the
#: first 4 MiB and the last 1.5 MiB of a device (btrfs at 64 KiB, ZFS labels,
#: RAID superblocks and the backup GPT at the end, ...).
_PROBE_HEAD = 4 * 1024 * 1024 + 4096
_PROBE_TAIL = 2 * 1024 * 1024


def _read_ahead(fd: int) -> None:
    """Ask for the regions libblkid reads in a few large reads, not ~30 small ones.

    libblkid turns readahead off (POSIX_FADV_RANDOM), so on a cold device
    every page it touches is its own read; through a loop device that is
    ~0.4 ms each, and the cache is cold every time, because the kernel drops
    a block device's page cache when its last opener closes it. Only a hint:
    a page not read ahead is read when libblkid asks for it.
    """
    try:
        size = block_device_size_fd(fd)
    except OSError:
        size = os.fstat(fd).st_size  # a regular file (an image) has no BLKGETSIZE64
    try:
        os.posix_fadvise(fd, 0, min(size, _PROBE_HEAD), os.POSIX_FADV_WILLNEED)
        if size > _PROBE_HEAD:
            tail = max(_PROBE_HEAD, size - _PROBE_TAIL)
            os.posix_fadvise(fd, tail, size - tail, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass


def probe_signatures(device: str) -> Probe:
    """Low-level probe for filesystem and partition-table signatures, as
    `blkid -p` does (it reads the device, not the udev cache).

    Superblocks with a bad checksum count as signatures (BLKID_SUBLKS_BADCSUM):
    the answer decides whether a device may be formatted, and a damaged
    filesystem is still somebody's data. Raises OSError when the device cannot
    be opened or read: that is never "blank".
    """
    lib = _blkid()
    # Our own descriptor, held across the probe, keeps the read-ahead pages cached.
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        _read_ahead(fd)
        ctypes.set_errno(0)
        pr = lib.blkid_new_probe_from_filename(os.fsencode(device))
        if not pr:
            err = ctypes.get_errno() or errno.EIO  # libblkid failed without an errno
            raise OSError(err, os.strerror(err), device)
        try:
            lib.blkid_probe_enable_superblocks(pr, 1)
            lib.blkid_probe_set_superblocks_flags(pr, BLKID_SUBLKS_TYPE | BLKID_SUBLKS_BADCSUM)
            lib.blkid_probe_enable_partitions(pr, 1)
            ctypes.set_errno(0)
            rc = lib.blkid_do_safeprobe(pr)
            if rc == 1:
                return Probe(ProbeStatus.BLANK)
            if rc == -2:
                return Probe(ProbeStatus.AMBIVALENT)
            if rc != 0:
                err = ctypes.get_errno() or errno.EIO
                raise OSError(err, f"probing failed: {os.strerror(err)}", device)
            return Probe(ProbeStatus.FOUND, _lookup(lib, pr, b"TYPE"), _lookup(lib, pr, b"PTTYPE"))
        finally:
            lib.blkid_free_probe(pr)
    finally:
        os.close(fd)


def _lookup(lib: ctypes.CDLL, pr: int, name: bytes) -> str | None:
    value = ctypes.c_char_p()
    size = ctypes.c_size_t()
    if lib.blkid_probe_lookup_value(pr, name, ctypes.byref(value), ctypes.byref(size)) != 0:
        return None
    return value.value.decode("utf-8", "replace") if value.value is not None else None
