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

The kernel's pid in sysfs is a pid of the init pid namespace, while an
agent in a container (the node pod has no hostPID) sees its own: a client
is therefore found from the local nbd-client processes (the /dev/nbdN in
each argument list) and accepted only when sysfs names that process's
global pid (`NSpid:` in /proc/<pid>/status). A pid reused by another
process never matches: it names no /dev/nbdN, or not this one.

Claims: a device whose client died (bridge crash, kill, a mirror leg's
timeout) and that nothing holds open is freed by the kernel (no pid, size
0): it looks free, yet a pod may still have its device node bind-mounted
(a bind mount does not hold the block device open) and would then write
into whatever volume gets that device next. So a device is handed out
only with a claim, `/run/tessera/nbd/nbdN.claim` (holding the client's
state directory), written under an exclusive flock on
`/run/tessera/nbd/.lock` (several agents may share one kernel: the
multi-node dev stack, the VM tests) and removed only after the device is
detached (`release_claim`). The kernel cannot arbitrate instead: in ioctl
mode nbd-client sets the size, flags and timeout before NBD_SET_SOCK, so a
second client racing for a live device would rewrite its settings before
the kernel says EBUSY. /run is tmpfs: claims vanish at reboot, exactly
when the devices do. The lock is held only to pick and claim, never while
a client connects (a TLS handshake with an unreachable owner takes long).

The module is loaded with the distribution's defaults: `nbds_max` (16
devices, /dev/nbd0-15) is a module parameter that takes effect only when the
module loads, so changing it here would mean unloading a module other
devices may be using. `claim_device` says so when all of them are taken.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tessera.errors import FailedPrecondition, Internal, ResourceExhausted
from tessera.system import blockdev, processes

log = logging.getLogger(__name__)

NBD_CLIENT = "nbd-client"
MODULE = "nbd"
SYS_BLOCK = Path("/sys/block")
SYS_MODULE = Path("/sys/module")
DEV = Path("/dev")
#: bridge sockets, device claims and their lock (tmpfs: gone at reboot with the devices)
RUN_DIR = Path("/run/tessera/nbd")
LOCK_FILE = ".lock"
CLAIM_SUFFIX = ".claim"
#: how long `nbd-client -d` gets, and then the resident client to exit
DETACH_TIMEOUT = 15.0
SECTOR = 512

_NBD_DEVICE = re.compile(r"/dev/nbd([0-9]+)")
_NBD_NAME = re.compile(r"nbd([0-9]+)")

#: with the flock on RUN_DIR/.lock (other processes), threads of this one
_CLAIM_LOCK = threading.Lock()


def check_device(device: str) -> str:
    """Only `/dev/nbdN` is ever read in sysfs or handed to nbd-client."""
    if not _NBD_DEVICE.fullmatch(device):
        raise Internal(f"{device!r} is not a kernel nbd device")
    return device


def _sys(device: str) -> Path:
    return SYS_BLOCK / Path(check_device(device)).name


def module_loaded(sys_module: Path | None = None) -> bool:
    return ((sys_module or SYS_MODULE) / MODULE).is_dir()


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


def devices(sys_block: Path | None = None) -> list[str]:
    """Every /dev/nbdN the kernel has, in number order."""
    try:
        names = [e.name for e in (sys_block or SYS_BLOCK).iterdir()]
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


def clients() -> dict[str, tuple[int, list[str]]]:
    """Every connected /dev/nbdN: (its resident client's pid here, its argument list)."""
    found = {}
    for pid in processes.matching(lambda a: os.path.basename(a[0]) == NBD_CLIENT):
        args = processes.cmdline(pid)
        device = next((a for a in args or [] if _NBD_DEVICE.fullmatch(a)), None)
        if args and device and client_pid(device) == global_pid(pid):
            found[device] = (pid, args)
    return found


def connected() -> dict[str, list[str]]:
    """Every connected /dev/nbdN and its resident client's argument list."""
    return {device: args for device, (_, args) in clients().items()}


def find(marker: str) -> str | None:
    """The connected /dev/nbdN whose client's argument list has an element equal to `marker`."""
    return next((d for d, args in connected().items() if marker in args), None)


def global_pid(pid: int) -> int | None:
    """`pid` (of this pid namespace) as the kernel's sysfs shows it: in the init namespace."""
    try:
        return parse_nspid(Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return None


def parse_nspid(status: str) -> int | None:
    """The first (outermost namespace's) pid of /proc/<pid>/status's `NSpid:` line."""
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            fields = line.split()[1:]
            return int(fields[0]) if fields and fields[0].isdigit() else None
    return None


# ---- claims ----------------------------------------------------------------------------


@contextmanager
def _claims_locked() -> Iterator[None]:
    """Exclusive over claims, for every thread and process on this kernel."""
    RUN_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _CLAIM_LOCK:
        fd = os.open(RUN_DIR / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock


def claim_path(device: str) -> Path:
    return RUN_DIR / f"{Path(check_device(device)).name}{CLAIM_SUFFIX}"


def claims() -> dict[str, str]:
    """{/dev/nbdN: the state directory of the client that claimed it}, alive or dead."""
    found = {}
    try:
        entries = sorted(RUN_DIR.iterdir())
    except OSError:
        return found
    for entry in entries:
        m = _NBD_NAME.fullmatch(entry.name.removesuffix(CLAIM_SUFFIX))
        if entry.name.endswith(CLAIM_SUFFIX) and m:
            try:
                found[f"/dev/{m.group(0)}"] = entry.read_text()
            except OSError:
                continue  # released meanwhile
    return found


def claim_device(owner: str) -> str:
    """Claim the lowest /dev/nbdN with no client, size 0, no claim and no holders for
    `owner` (a client's state directory); ResourceExhausted when there is none."""
    with _claims_locked():
        every = devices()
        for device in every:
            if (
                client_pid(device) is None
                and size_bytes(device) == 0
                and not claim_path(device).exists()
                and not blockdev.holders(device)
            ):
                tmp = RUN_DIR / f".{Path(device).name}.tmp"
                tmp.write_text(owner)
                os.replace(tmp, claim_path(device))  # whole or not at all
                return device
    if not every:
        raise ResourceExhausted(
            f"kernel module {MODULE} has no devices (its nbds_max is {_nbds_max()}; it sets "
            "how many there are when the module loads)"
        )
    raise ResourceExhausted(
        f"every kernel nbd device is in use or claimed ({len(every)}; module {MODULE}'s "
        "nbds_max sets how many there are when it loads)"
    )


def release_claim(device: str, owner: str) -> None:
    """Drop `owner`'s claim on `device` (after detaching it); another's claim stays."""
    with _claims_locked():
        path = claim_path(device)
        try:
            if path.read_text() == owner:
                path.unlink()
        except FileNotFoundError:
            pass


def _nbds_max() -> str:
    try:
        return (SYS_MODULE / MODULE / "parameters" / "nbds_max").read_text().strip()
    except OSError:
        return "unknown"


def detach(device: str, pid: int | None) -> None:
    """Disconnect `device` (`nbd-client -d`), then wait for its resident client `pid` (of
    this pid namespace: `clients`) to exit, terminating it after a grace; a device or
    client already gone is fine (a device whose client died is reset all the same)."""
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
