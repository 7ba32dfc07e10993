"""device-mapper devices for striped volumes: a `striped` table over the legs.

raid0 has no on-disk metadata: the table (legs in index order, chunk, length)
is rebuilt from what management stored, so assembly is exact by
construction. The device is named `tessera-<volume-id>` and carries the dm
UUID `TESSERA-<volume-id>`; sysfs (/sys/block/dm-N/dm/name) finds it again
after a restart, and `dmsetup table` reads back what it was made of.

Devices in tables are given as major:minor: what the kernel resolves them
to anyway, and exact even where udev has not made a node yet.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tessera.errors import FailedPrecondition, Internal, InvalidArgument
from tessera.system.processes import run_tool

log = logging.getLogger(__name__)

DMSETUP = "dmsetup"
TIMEOUT = 60.0
SECTOR = 512
SYS_BLOCK = Path("/sys/block")
NAME_PREFIX = "tessera-"
UUID_PREFIX = "TESSERA-"


def dm_name(volume_id: str) -> str:
    return NAME_PREFIX + volume_id


def dm_uuid(volume_id: str) -> str:
    return UUID_PREFIX + volume_id


@dataclass(frozen=True)
class Striped:
    """One `striped` target: `length` sectors over `devices` (major:minor), `chunk` sectors each."""

    length: int
    chunk: int
    devices: list[str]

    def line(self) -> str:
        legs = " ".join(f"{d} 0" for d in self.devices)
        return f"0 {self.length} striped {len(self.devices)} {self.chunk} {legs}"


def striped_table(devices: list[str], chunk_bytes: int, data_bytes: int) -> Striped:
    """The table of a raid0 volume: legs in index order; what the kernel would refuse
    (a length not a whole number of chunks on every leg) is refused here, naming why."""
    if len(devices) < 2:
        raise InvalidArgument("a striped device needs at least 2 legs", field="connection.legs")
    if chunk_bytes <= 0 or chunk_bytes % 4096 or chunk_bytes & (chunk_bytes - 1):
        raise InvalidArgument(
            f"chunk_bytes {chunk_bytes} is not a power of two of at least 4 KiB",
            field="connection.chunk_bytes",
        )
    if data_bytes <= 0 or data_bytes % (chunk_bytes * len(devices)):
        raise InvalidArgument(
            f"data_bytes {data_bytes} is not a whole number of {len(devices)} x {chunk_bytes}-byte "
            "chunks",
            field="connection.data_bytes",
        )
    return Striped(data_bytes // SECTOR, chunk_bytes // SECTOR, list(devices))


def parse_table(text: str) -> Striped | None:
    """`dmsetup table NAME` of a one-target striped device; None for anything else."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if len(lines) != 1:
        return None
    words = lines[0].split()
    if len(words) < 5 or words[0] != "0" or words[2] != "striped":
        return None
    try:
        length, stripes, chunk = int(words[1]), int(words[3]), int(words[4])
    except ValueError:
        return None
    pairs = words[5:]
    if len(pairs) != 2 * stripes:
        return None
    return Striped(length, chunk, pairs[0::2])


def device_number(path: str) -> str:
    """`/dev/loop3` -> "7:3" (what tables hold)."""
    st = os.stat(path)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def ensure_module() -> None:
    """device-mapper loaded (dmsetup cannot create anything without /dev/mapper/control)."""
    if Path("/sys/module/dm_mod").exists():
        return
    try:
        done = subprocess.run(
            ["modprobe", "dm_mod"], capture_output=True, text=True, check=False, timeout=60
        )
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        raise FailedPrecondition(f"cannot load kernel module dm_mod: {exc}") from exc
    if done.returncode != 0:
        raise FailedPrecondition(
            f"this node cannot compose striped volumes: modprobe dm_mod: "
            f"{done.stderr.strip() or 'failed'}"
        )


def create_argv(name: str, uuid: str, table: Striped, readonly: bool) -> list[str]:
    options = ["--readonly"] if readonly else []
    return [DMSETUP, "create", *options, "--uuid", uuid, "--table", table.line(), name]


def create(name: str, uuid: str, table: Striped, readonly: bool) -> str:
    """Make the device; its /dev/dm-N path (devtmpfs makes that node, udev or not)."""
    _dmsetup(create_argv(name, uuid, table, readonly), f"creating device-mapper device {name}")
    found = find(name)
    if found is None:
        raise Internal(f"device-mapper device {name} was created but is not in sysfs")
    log.info("created %s (%s) over %s", name, found, " ".join(table.devices))
    return found


def reload(name: str, table: Striped) -> None:
    """Load a new table (a grown length) and switch to it: suspend flushes in-flight I/O."""
    _dmsetup([DMSETUP, "reload", name, "--table", table.line()], f"reloading {name}")
    _dmsetup([DMSETUP, "suspend", name], f"suspending {name}")
    try:
        _dmsetup([DMSETUP, "resume", name], f"resuming {name}")
    except Internal:
        _dmsetup([DMSETUP, "resume", name], f"resuming {name} again")  # never leave it suspended


def table(name: str) -> Striped | None:
    return parse_table(_dmsetup([DMSETUP, "table", name], f"reading the table of {name}"))


def remove(name: str) -> None:
    """Remove the device; gone is fine."""
    if find(name) is None:
        return
    _dmsetup([DMSETUP, "remove", "--retry", name], f"removing {name}")
    log.info("removed device-mapper device %s", name)


def find(name: str) -> str | None:
    """/dev/dm-N of the device called `name`, from sysfs; None when there is none."""
    for kernel in devices():
        if _read(SYS_BLOCK / kernel / "dm" / "name") == name:
            return f"/dev/{kernel}"
    return None


def devices() -> list[str]:
    try:
        names = os.listdir(SYS_BLOCK)
    except OSError:
        return []
    return sorted(n for n in names if n.startswith("dm-"))


def named(prefix: str) -> dict[str, str]:
    """dm name -> /dev/dm-N for every device whose name starts with `prefix`."""
    found = {}
    for kernel in devices():
        name = _read(SYS_BLOCK / kernel / "dm" / "name")
        if name.startswith(prefix):
            found[name] = f"/dev/{kernel}"
    return found


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _dmsetup(argv: list[str], what: str) -> str:
    return run_tool(argv, what, TIMEOUT)
