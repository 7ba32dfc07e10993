"""The kernel's NBD client: /dev/nbdN devices, the `nbd` module and `nbd-client`.

Used by node_agent/transports/nbd_kernel.py (one device on one remote
export, through a local TLS bridge). Everything here is about the kernel's
side and is keyed by the device path, which is only ever `/dev/nbdN`.

Devices are connected in ioctl mode (`nbd-client -nonetlink -nofork`):
nbd-client stays resident inside NBD_DO_IT for the connection's lifetime
and the kernel shows its pid in /sys/block/nbdN/pid. That pid's command
line is what tells which device is whose (`find`): nbd-client 3.24 has no
backend identifier, and netlink mode leaves no process behind, so a device
could only be guessed, never found, after an agent restart.

The module is loaded with the distribution's defaults: `nbds_max` (16
devices, /dev/nbd0-15) is a module parameter that takes effect only when the
module loads, so changing it here would mean unloading a module other
devices may be using. `free_device` says so when all of them are taken.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
from pathlib import Path

from tessera.errors import FailedPrecondition, Internal, ResourceExhausted
from tessera.system import processes

log = logging.getLogger(__name__)

NBD_CLIENT = "nbd-client"
MODULE = "nbd"
SYS_BLOCK = Path("/sys/block")
SYS_MODULE = Path("/sys/module")
DEV = Path("/dev")
#: how long `nbd-client -d` gets, and then the resident client to exit
DETACH_TIMEOUT = 15.0
SECTOR = 512

_NBD_DEVICE = re.compile(r"/dev/nbd([0-9]+)")
_NBD_NAME = re.compile(r"nbd([0-9]+)")

#: free_device names a device without claiming it: two connects at once in one
#: process would be given the same one, so callers hold this from picking a
#: device until its client shows in sysfs (or has failed). Another process doing
#: the same meets EBUSY from the kernel and picks again.
FIND_LOCK = threading.Lock()


def check_device(device: str) -> str:
    """Only `/dev/nbdN` is ever read in sysfs or handed to nbd-client."""
    if not _NBD_DEVICE.fullmatch(device):
        raise Internal(f"{device!r} is not a kernel nbd device")
    return device


def _sys(device: str) -> Path:
    return SYS_BLOCK / Path(check_device(device)).name


def module_loaded(sys_module: Path = SYS_MODULE) -> bool:
    return (sys_module / MODULE).is_dir()


def ensure_module() -> None:
    """Load `nbd` (with its default nbds_max) unless the kernel has it already."""
    if module_loaded():
        return
    try:
        done = subprocess.run(
            ["modprobe", MODULE], capture_output=True, text=True, timeout=60, check=False
        )
    except FileNotFoundError as exc:
        raise FailedPrecondition(
            f"cannot load kernel module {MODULE}: modprobe is not installed on this node"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise FailedPrecondition(f"loading kernel module {MODULE} did not finish in 60s") from exc
    if done.returncode != 0 or not module_loaded():
        raise FailedPrecondition(
            f"this node cannot load kernel module {MODULE} (the kernel nbd client): "
            f"{done.stderr.strip() or f'modprobe exited {done.returncode}'}"
        )
    log.info("loaded kernel module %s", MODULE)


def devices(sys_block: Path = SYS_BLOCK) -> list[str]:
    """Every /dev/nbdN the kernel has, in number order."""
    try:
        names = [e.name for e in sys_block.iterdir()]
    except OSError:
        return []
    numbers = sorted(int(m.group(1)) for n in names if (m := _NBD_NAME.fullmatch(n)))
    return [f"/dev/nbd{n}" for n in numbers]


def client_pid(device: str) -> int | None:
    """The pid of the client serving `device` (ioctl mode); None when not connected."""
    try:
        text = (_sys(device) / "pid").read_text().strip()
    except OSError:
        return None  # the kernel removes the attribute when the device disconnects
    return int(text) if text.isdigit() and int(text) > 0 else None


def size_bytes(device: str) -> int:
    """The device's size as the kernel has it (0 when not connected)."""
    try:
        return int((_sys(device) / "size").read_text()) * SECTOR
    except (OSError, ValueError):
        return 0


def read_only(device: str) -> bool:
    try:
        return (_sys(device) / "ro").read_text().strip() == "1"
    except OSError:
        return False


def connected() -> dict[str, list[str]]:
    """Every connected /dev/nbdN and its resident client's argument list."""
    found = {}
    for device in devices():
        pid = client_pid(device)
        args = processes.cmdline(pid) if pid is not None else None
        if args:
            found[device] = args
    return found


def find(marker: str) -> str | None:
    """The connected /dev/nbdN whose client's argument list has an element equal to `marker`."""
    return next((d for d, args in connected().items() if marker in args), None)


def free_device() -> str:
    """The lowest /dev/nbdN with no client and size 0 (hold FIND_LOCK until it is used)."""
    for device in devices():
        if client_pid(device) is None and size_bytes(device) == 0:
            return device
    raise ResourceExhausted(
        f"every kernel nbd device is in use ({len(devices())}; module {MODULE}'s nbds_max "
        "sets how many there are when it loads)"
    )


def detach(device: str, pid: int | None) -> None:
    """Disconnect `device` (`nbd-client -d`), then wait for its resident client `pid` to
    exit, terminating it after a grace; a device or client already gone is fine."""
    check_device(device)
    try:
        done = subprocess.run(
            [NBD_CLIENT, "-d", device],
            capture_output=True,
            text=True,
            timeout=DETACH_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0 and client_pid(device) is not None:
            log.warning("nbd-client -d %s: %s", device, done.stderr.strip())
    except FileNotFoundError as exc:
        raise FailedPrecondition(
            f"cannot disconnect {device}: {NBD_CLIENT} is not installed"
        ) from exc
    except subprocess.TimeoutExpired:
        log.warning("nbd-client -d %s did not answer in %.0fs", device, DETACH_TIMEOUT)
    if pid is None:
        return
    deadline = time.monotonic() + DETACH_TIMEOUT
    while time.monotonic() < deadline and _is_client(pid):
        time.sleep(0.05)
    processes.terminate(pid, NBD_CLIENT)


def _is_client(pid: int) -> bool:
    args = processes.cmdline(pid)
    return bool(args) and Path(args[0]).name == NBD_CLIENT  # type: ignore[index]
