"""md (Linux software RAID) arrays for mirrored volumes: mdadm to make and change them,
the superblock and sysfs to read them.

What an array *is* is read without mdadm: a member's v1.2 superblock (4 KiB
into the device) says which array it belongs to, how many events it has
seen and which slot it fills; `/sys/block/mdN/md/` says how the running
array is doing (degraded, resync progress, each member's state). Both are
exact and cheap, and neither parses text meant for people.

Changing an array is mdadm's job, always with the member devices listed:
never `--scan`, never a config file (`--config=none`), so an array is only
ever made of the legs we name. Failing and removing a member goes through
sysfs by the member's kernel name, which still works when its device node
is gone (a remote leg whose controller was deleted).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tessera.errors import FailedPrecondition, Internal, Unavailable
from tessera.layouts import MD_DATA_OFFSET
from tessera.models import Layout
from tessera.system.processes import run_tool

log = logging.getLogger(__name__)

MDADM = "mdadm"
TIMEOUT = 120.0
SYS_BLOCK = Path("/sys/block")
#: where a v1.2 superblock lives on a member
SUPER_OFFSET = 4096
SB_MAGIC = 0xA92B4EFC
#: dev_roles values that are no slot
ROLE_SPARE = 0xFFFF
ROLE_FAULTY = 0xFFFE
ROLE_JOURNAL = 0xFFFD
#: what is read to see a superblock: it, and up to 1920 members' roles after it
_READ_BYTES = 2 * 4096
#: mdadm's own margin: a member one event behind was mid-update at a crash, not stale
EVENT_MARGIN = 1
#: md's names are at most 32 bytes (set_name)
MAX_NAME = 31
#: how long a failed member's pending I/O gets to drain before it can be removed
REMOVE_WAIT = 30.0
#: how long a new array may be held open (udev's probe) before it can be made read-only
READONLY_WAIT = 10.0


# ---- the superblock ------------------------------------------------------------


@dataclass(frozen=True)
class Superblock:
    """What a member's v1.2 superblock says (struct mdp_superblock_1, little-endian)."""

    array_uuid: str  # the array's UUID, 8-4-4-4-12 lower-case, as mdadm --uuid takes it
    name: str
    level: int
    raid_disks: int
    events: int
    dev_number: int
    role: int  # the slot this member fills; ROLE_SPARE / ROLE_FAULTY otherwise
    data_offset_bytes: int
    size_bytes: int  # used data per member
    roles: tuple[int, ...] = ()  # every member's role as this superblock last saw them

    @property
    def slot(self) -> int | None:
        return self.role if self.role < ROLE_JOURNAL else None

    def says_failed(self, dev_number: int) -> bool:
        """Whether this superblock records member `dev_number` as failed or removed."""
        return dev_number < len(self.roles) and self.roles[dev_number] == ROLE_FAULTY


def parse_superblock(raw: bytes) -> Superblock | None:
    """The superblock in `raw` (the device's first bytes, or the 4 KiB block alone); None
    when there is none. The checksum is not verified: any md superblock, even a
    damaged one, means the device holds someone's array and must never be created over."""
    block = raw[SUPER_OFFSET:] if len(raw) > SUPER_OFFSET else raw
    if len(block) < 256:
        return None
    magic, major = struct.unpack_from("<II", block, 0)
    if magic != SB_MAGIC or major != 1:
        return None
    set_uuid = block[16:32]
    name = block[32:64].split(b"\0", 1)[0].decode("utf-8", "replace")
    level, _layout, size = struct.unpack_from("<iIQ", block, 72)
    raid_disks = struct.unpack_from("<I", block, 92)[0]
    data_offset = struct.unpack_from("<Q", block, 128)[0]
    dev_number = struct.unpack_from("<I", block, 160)[0]
    events = struct.unpack_from("<Q", block, 200)[0]
    max_dev = struct.unpack_from("<I", block, 220)[0]
    count = min(max_dev, (len(block) - 256) // 2)
    roles = struct.unpack_from(f"<{count}H", block, 256) if count > 0 else ()
    role = roles[dev_number] if dev_number < len(roles) else ROLE_SPARE
    return Superblock(
        array_uuid=str(uuid.UUID(bytes=bytes(set_uuid))),
        name=name,
        level=level,
        raid_disks=raid_disks,
        events=events,
        dev_number=dev_number,
        role=role,
        data_offset_bytes=data_offset * 512,
        size_bytes=size * 512,
        roles=tuple(roles),
    )


def examine(device: str) -> Superblock | None:
    """The md superblock on `device` (None: there is none at the v1.2 place).

    Read with O_DIRECT: md writes superblocks past the page cache, so a
    buffered read could see an old one. Unreadable is an error, never "none".
    """
    buf = mmap.mmap(-1, _READ_BYTES)  # page-aligned, as O_DIRECT wants
    try:
        try:
            fd = os.open(device, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # a file on tmpfs (no O_DIRECT): no md writes to it behind the page cache
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise Unavailable(f"cannot open {device} to read its md superblock: {exc}") from exc
    try:
        got = os.readv(fd, [buf])
    except OSError as exc:
        raise Unavailable(f"cannot read the md superblock of {device}: {exc}") from exc
    finally:
        os.close(fd)
    return parse_superblock(bytes(buf[:got]))


def is_stale(member: Superblock, newest: Superblock) -> bool:
    """Missed writes the others saw: never assembled, never added back (its node died).

    Behind the newest superblock by more than mdadm's margin, or recorded by
    it as failed (md marks a member faulty and goes on: one event later).
    """
    if member.events + EVENT_MARGIN < newest.events:
        return True
    return member.events < newest.events and newest.says_failed(member.dev_number)


# ---- mdadm -----------------------------------------------------------------------


def ensure_modules(layout: Layout | str) -> None:
    """md and the layout's personality, loaded when they are not (mdadm would only say
    "personality not loaded" after writing superblocks)."""
    level = md_level(layout)
    _modprobe("md_mod", "md_mod")
    _modprobe(level, level)


def _modprobe(module: str, sys_name: str) -> None:
    if Path("/sys/module", sys_name).exists():
        return
    try:
        done = subprocess.run(
            ["modprobe", module], capture_output=True, text=True, check=False, timeout=60
        )
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        raise FailedPrecondition(f"cannot load kernel module {module}: {exc}") from exc
    if done.returncode != 0:
        raise FailedPrecondition(
            f"this node cannot compose mirrored volumes: modprobe {module}: "
            f"{done.stderr.strip() or 'failed'}"
        )


def md_name(volume_id: str) -> str:
    """The array's name in its superblock: the volume id, cut to what md keeps."""
    return volume_id[:MAX_NAME]


def md_level(layout: Layout | str) -> str:
    layout = Layout(layout)
    if layout == Layout.RAID1:
        return "raid1"
    if layout == Layout.RAID10:
        return "raid10"
    raise Internal(f"layout {layout.value} is not made with md")


def create_argv(
    array: str,
    array_uuid: str,
    name: str,
    layout: Layout | str,
    members: list[str],
    leg_data_bytes: int,
    chunk_bytes: int,
) -> list[str]:
    """`mdadm --create` for a new array on blank legs (all zero: --assume-clean is true).

    v1.2 superblock and internal bitmap before the data at MD_DATA_OFFSET
    (so every leg's size is its data plus that, tessera.layouts.leg_size),
    the data size per leg fixed (--size), the UUID management chose, no
    homehost (the array belongs to no host: any consumer may assemble it).
    """
    argv = [
        MDADM,
        "--create",
        array,
        "--config=none",
        "--run",
        "--metadata=1.2",
        f"--level={md_level(layout)}",
        f"--raid-devices={len(members)}",
        f"--data-offset={MD_DATA_OFFSET // 1024}K",
        "--bitmap=internal",
        "--assume-clean",
        f"--size={leg_data_bytes // 1024}K",
        f"--uuid={array_uuid}",
        f"--name={name}",
        "--homehost=<none>",
    ]
    if Layout(layout) == Layout.RAID10:
        argv += ["--layout=n2", f"--chunk={chunk_bytes // 1024}K"]
    return argv + members


def assemble_argv(array: str, array_uuid: str, members: list[str], readonly: bool) -> list[str]:
    """`mdadm --assemble` of exactly this UUID from exactly these devices (never --scan)."""
    argv = [MDADM, "--assemble", array, "--config=none", "--run", f"--uuid={array_uuid}"]
    if readonly:
        argv.append("--readonly")
    return argv + members


def create(
    array: str,
    array_uuid: str,
    name: str,
    layout: Layout | str,
    members: list[str],
    leg_data_bytes: int,
    chunk_bytes: int,
) -> None:
    _mdadm(
        create_argv(array, array_uuid, name, layout, members, leg_data_bytes, chunk_bytes),
        f"creating md array {array_uuid} on {', '.join(members)}",
    )
    log.info("created md array %s (%s) on %s", array_uuid, name, ", ".join(members))


def assemble(array: str, array_uuid: str, members: list[str], readonly: bool) -> None:
    _mdadm(
        assemble_argv(array, array_uuid, members, readonly),
        f"assembling md array {array_uuid} from {', '.join(members)}",
    )
    log.info("assembled md array %s from %s", array_uuid, ", ".join(members))


def add(array: str, member: str) -> None:
    """A new (blank) member: md recovers it from the others (progress in sync_completed)."""
    _mdadm([MDADM, "--manage", array, "--add", member], f"adding {member} to {array}")
    log.info("added %s to %s: recovery starts", member, array)


def grow_argv(array: str) -> list[str]:
    """Use all of every member; the new space is zero on every leg (sparse files grown
    together), so it is already in sync (--assume-clean: no resync of it)."""
    return [MDADM, "--grow", array, "--size=max", "--assume-clean"]


def grow(array: str) -> None:
    _mdadm(grow_argv(array), f"growing {array}")


def set_readonly(array: str) -> None:
    """Read-only for good (not `read-auto`, which the first write turns read-write).

    mdadm refuses while something has the device open (udev's probe of a
    new array, for a moment): asked again until READONLY_WAIT is over.
    """
    name = os.path.basename(os.path.realpath(array))
    deadline = time.monotonic() + READONLY_WAIT
    while _read(SYS_BLOCK / name / "md" / "array_state") != "readonly":
        try:
            _mdadm([MDADM, "--readonly", array], f"making {array} read-only")
        except Internal:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def stop(array: str) -> None:
    _mdadm([MDADM, "--stop", array], f"stopping {array}")
    log.info("stopped %s", array)


def _mdadm(argv: list[str], what: str) -> None:
    run_tool(argv, what, TIMEOUT)


# ---- the running array (sysfs) ------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One member as /sys/block/mdN/md/dev-<name>/ shows it."""

    name: str  # the member's kernel name (loop3, nvme1n1)
    slot: int | None
    states: frozenset[str]

    @property
    def faulty(self) -> bool:
        return "faulty" in self.states

    @property
    def in_sync(self) -> bool:
        return "in_sync" in self.states and not self.faulty


@dataclass(frozen=True)
class ArrayState:
    """How a running array is doing, from sysfs."""

    device: str  # /dev/mdN
    level: str
    raid_disks: int
    array_state: str
    degraded: int
    sync_action: str
    sync_completed: tuple[int, int] | None  # (done, total) sectors while syncing
    members: list[Member] = field(default_factory=list)

    @property
    def syncing(self) -> bool:
        return self.sync_action in ("resync", "recover") or self.sync_completed is not None


def parse_sync_completed(text: str) -> tuple[int, int] | None:
    """`sync_completed`: "none" when idle, else "<done> / <total>" sectors."""
    parts = text.strip().split("/")
    if len(parts) != 2:
        return None
    try:
        done, total = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return (done, total) if total > 0 else None


def parse_slot(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() else None


def parse_states(text: str) -> frozenset[str]:
    """A member's `state`: comma-separated words (in_sync, faulty, spare, write_mostly…)."""
    return frozenset(w for w in text.strip().split(",") if w)


def arrays() -> list[str]:
    """Kernel names of every md array there is (active or not)."""
    try:
        names = os.listdir(SYS_BLOCK)
    except OSError:
        return []
    return sorted(n for n in names if n.startswith("md") and (SYS_BLOCK / n / "md").is_dir())


def state(name: str) -> ArrayState:
    """The array `name` (md127), read from sysfs; Unavailable once it is gone."""
    base = SYS_BLOCK / name / "md"
    try:
        members = [_member(entry) for entry in sorted(base.glob("dev-*"))]
        return ArrayState(
            device=f"/dev/{name}",
            level=_read(base / "level"),
            raid_disks=int(_read(base / "raid_disks") or 0),
            array_state=_read(base / "array_state"),
            degraded=int(_read(base / "degraded") or 0) if (base / "degraded").exists() else 0,
            sync_action=_read(base / "sync_action") if (base / "sync_action").exists() else "",
            sync_completed=parse_sync_completed(_read(base / "sync_completed"))
            if (base / "sync_completed").exists()
            else None,
            members=members,
        )
    except (OSError, ValueError) as exc:
        raise Unavailable(f"cannot read the state of md array {name}: {exc}") from exc


def array_uuid(name: str) -> str | None:
    """The UUID of array `name` (md127): its sysfs `uuid` (kernels since 5.10), else the
    superblock of a member md holds in sync (a failed remote member could block a read
    for its controller's whole timeout)."""
    text = _read_or_none(SYS_BLOCK / name / "md" / "uuid")
    if text:
        try:
            return str(uuid.UUID(text))
        except ValueError:
            pass
    try:
        members = state(name).members
    except Unavailable:
        return None
    for member in sorted(members, key=lambda m: not m.in_sync):
        if member.faulty:
            continue
        try:
            sb = examine(f"/dev/{member.name}")
        except Unavailable:
            continue
        if sb is not None:
            return sb.array_uuid
    return None


def member_names(name: str) -> list[str]:
    """Kernel names of the array's members (dev-<name> entries), faulty ones too."""
    base = SYS_BLOCK / name / "md"
    try:
        return sorted(e.name.removeprefix("dev-") for e in base.glob("dev-*"))
    except OSError:
        return []


def _member(entry: Path) -> Member:
    return Member(
        name=entry.name.removeprefix("dev-"),
        slot=parse_slot(_read(entry / "slot")),
        states=parse_states(_read(entry / "state")),
    )


def fail_and_remove(name: str, member: str) -> None:
    """Take `member` out of array `name` by its kernel name: faulty, then removed.

    Through sysfs (as mdadm --fail/--remove end up doing), so a member whose
    device node is already gone can still be removed. Gone already is fine.
    """
    entry = SYS_BLOCK / name / "md" / f"dev-{member}"
    for word in ("faulty", "remove"):
        deadline = time.monotonic() + REMOVE_WAIT
        while True:
            try:
                (entry / "state").write_text(word)
                break
            except FileNotFoundError:
                return
            except OSError as exc:
                # EBUSY: I/O still pending on the member md just failed; it drains
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise Internal(
                        f"cannot mark {member} {word} in md array {name}: {exc}"
                    ) from exc
                time.sleep(0.1)
    log.info("removed %s from md array %s", member, name)


def _read(path: Path) -> str:
    return path.read_text().strip()


def _read_or_none(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
