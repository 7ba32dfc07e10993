"""NVMe/TCP host (initiator) side: connect, find, rescan and disconnect, through the kernel.

Used by the single-leg `nvme-tcp` transport (node_agent/transports/nvme_tcp.py)
and by the `composed` transport for remote legs. The API, all keyed by the
(subsystem NQN, host NQN) pair a leg is connected with:

    target = Target(host, port, subsystem_nqn, host_nqn)   # where and who we are
    ctrl = connect(target, secret, SINGLE_LEG)    # or MIRROR_LEG; idempotent
    device = wait_namespace(target)               # "/dev/nvme3n1", sysfs only
    find_controllers(target) / controller_of(target)   # what the kernel has
    namespace_device(target)                      # None while there is none
    rescan(target)                                # a grown namespace shows its size
    condition(target)                             # "" when live, else why not
    disconnect(target)                            # every controller of it; gone is fine
    controllers(host_nqn_prefix)                  # re-adoption: all of ours

`secret` is the DH-HMAC-CHAP secret (tessera.nvme_names.dhchap_secret of the
attachment's key). It is written to the kernel and nowhere else: it never
appears in an argument list (so not in /proc/*/cmdline), a log line, an
exception or a repr.

Why not `nvme connect`: nvme-cli writes the very same option string to
/dev/nvme-fabrics and reads back `instance=N,cntlid=M`. Doing that here
keeps the secret out of every process's command line and tells exactly
which controller the connect made, instead of guessing it afterwards.

Timeouts (the contract's policy): a single-leg volume waits for a lost
target for 600 s and never fails I/O early (a filesystem would rather wait
than see EIO); a mirror leg fails I/O after 5 s and gives the controller up
after 60 s, so md sees the dead leg quickly and carries on with the others.

Finding the device (never by guessing, never by "the newest nvme device"):
the controller in /sys/class/nvme whose `subsysnqn` and `hostnqn` are the
target's (and whose `address` is the target's traddr/trsvcid when given),
then its namespace whose `nsid` is 1. With native multipath the
controller's entry is the hidden path `nvme<S>c<C>n<N>` and the block
device is the head `nvme<S>n<N>` of subsystem `nvme-subsys<S>`, whose
`subsysnqn` is checked too. The namespace appears a moment after the
connect returns (the kernel scans asynchronously): `wait_namespace` polls.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tessera.errors import FailedPrecondition, Unavailable
from tessera.nvme_names import ctrl_secret_of

log = logging.getLogger(__name__)

FABRICS_DEVICE = Path("/dev/nvme-fabrics")
SYSFS_NVME = Path("/sys/class/nvme")
SYSFS_SUBSYSTEMS = Path("/sys/class/nvme-subsystem")
SYSFS_BLOCK = Path("/sys/class/block")
DEV = Path("/dev")
#: the namespace every export has (nvmet.NSID)
NSID = 1
#: how long a namespace gets to appear after its controller connected
NAMESPACE_WAIT = 15.0
#: nvme-tcp's registered port
DEFAULT_PORT = 4420

#: controller states that still serve, or will again (the kernel reconnects on its own)
ALIVE = ("new", "live", "resetting", "connecting")

_PATH_NAME = re.compile(r"^nvme(\d+)c(\d+)n(\d+)$")
_NS_NAME = re.compile(r"^nvme(\d+)n(\d+)$")


@dataclass(frozen=True)
class Timeouts:
    """Controller loss policy (seconds); `fast_io_fail` None: never fail I/O early."""

    ctrl_loss: int
    reconnect_delay: int
    fast_io_fail: int | None


#: a whole volume over one controller: wait for the target rather than fail I/O
SINGLE_LEG = Timeouts(ctrl_loss=600, reconnect_delay=2, fast_io_fail=None)
#: one mirror leg: fail fast so md degrades and carries on
MIRROR_LEG = Timeouts(ctrl_loss=60, reconnect_delay=2, fast_io_fail=5)


@dataclass(frozen=True)
class Target:
    """A subsystem reached at host:port, as the host NQN `host_nqn` (our identity)."""

    host: str
    port: int
    subsystem_nqn: str
    host_nqn: str
    host_id: str = ""

    def where(self) -> str:
        return f"{self.subsystem_nqn} at {self.host}:{self.port}"


@dataclass(frozen=True)
class Controller:
    """One NVMe controller the kernel has: /sys/class/nvme/<name>."""

    name: str
    subsystem_nqn: str
    host_nqn: str
    address: dict[str, str] = field(default_factory=dict, compare=False)
    state: str = ""

    def matches(self, target: Target) -> bool:
        if (self.subsystem_nqn, self.host_nqn) != (target.subsystem_nqn, target.host_nqn):
            return False
        traddr, trsvcid = self.address.get("traddr"), self.address.get("trsvcid")
        # compare the address only when the kernel states one (it always does for tcp)
        return (traddr is None or traddr == target.host) and (
            trsvcid is None or trsvcid == str(target.port)
        )


def fabrics_options(target: Target, secret: str, timeouts: Timeouts) -> str:
    """The option string /dev/nvme-fabrics takes (what `nvme connect` would write).

    Contains the secret: write it to the kernel, never log or raise it.
    """
    if "," in secret or "\n" in secret:
        raise ValueError("nvme connect option dhchap_secret holds a character it may not")
    values = {
        "transport": "tcp",
        "traddr": target.host,
        "trsvcid": str(target.port),
        "nqn": target.subsystem_nqn,
        "hostnqn": target.host_nqn,
        "hostid": target.host_id,
        "ctrl_loss_tmo": str(timeouts.ctrl_loss),
        "reconnect_delay": str(timeouts.reconnect_delay),
        "fast_io_fail_tmo": str(timeouts.fast_io_fail if timeouts.fast_io_fail is not None else -1),
        "dhchap_secret": secret,
        # bidirectional: the target proves it holds the attachment's key too
        "dhchap_ctrl_secret": ctrl_secret_of(secret) if secret else "",
    }
    for name, value in values.items():
        # a comma or newline would smuggle in another option; the value itself is never
        # echoed (it may be the secret)
        if "," in value or "\n" in value or (not name.startswith("dhchap") and "=" in value):
            raise ValueError(f"nvme connect option {name} holds a character it may not")
    return ",".join(f"{k}={v}" for k, v in values.items() if v)


def _read(path: Path) -> str | None:
    """A sysfs attribute, or None when it is gone (a controller may vanish at any moment)."""
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _parse_address(text: str) -> dict[str, str]:
    """`traddr=10.0.0.2,trsvcid=4420[,src_addr=…]` -> a dict (newer kernels add fields)."""
    pairs = (item.partition("=") for item in text.split(",") if "=" in item)
    return {k.strip(): v.strip() for k, _, v in pairs}


def _controller(directory: Path) -> Controller | None:
    subnqn = _read(directory / "subsysnqn")
    hostnqn = _read(directory / "hostnqn")
    if subnqn is None or hostnqn is None:
        return None
    return Controller(
        name=directory.name,
        subsystem_nqn=subnqn,
        host_nqn=hostnqn,
        address=_parse_address(_read(directory / "address") or ""),
        state=_read(directory / "state") or "",
    )


def all_controllers() -> list[Controller]:
    """Every fabrics controller with a host NQN the kernel has now."""
    if not SYSFS_NVME.is_dir():
        return []
    found = []
    for entry in sorted(SYSFS_NVME.iterdir()):
        if (ctrl := _controller(entry)) is not None:
            found.append(ctrl)
    return found


def controllers(host_nqn_prefix: str) -> list[Controller]:
    """The controllers whose host NQN starts with `host_nqn_prefix` (re-adoption)."""
    return [c for c in all_controllers() if c.host_nqn.startswith(host_nqn_prefix)]


def find_controllers(target: Target) -> list[Controller]:
    """The target's controllers (normally one; more after a duplicate connect)."""
    return [c for c in all_controllers() if c.matches(target)]


def controller_of(target: Target) -> Controller | None:
    """The target's controller, preferring a live one."""
    found = find_controllers(target)
    live = [c for c in found if c.state == "live"]
    return (live or found or [None])[0]


def namespace_device(target: Target, nsid: int = NSID) -> str | None:
    """/dev/<name> of namespace `nsid` behind the target's controller, from sysfs only."""
    for ctrl in find_controllers(target):
        device = _namespace_of(ctrl, nsid)
        if device is not None:
            return device
    return None


def _namespace_of(ctrl: Controller, nsid: int) -> str | None:
    directory = SYSFS_NVME / ctrl.name
    try:
        entries = sorted(directory.iterdir())
    except OSError:
        return None
    for entry in entries:
        if _read(entry / "nsid") != str(nsid):
            continue
        if _NS_NAME.match(entry.name):  # no multipath: the controller's own disk
            return str(DEV / entry.name)
        path = _PATH_NAME.match(entry.name)
        if path is None:
            continue
        head = f"nvme{path.group(1)}n{path.group(3)}"
        subsystem = SYSFS_SUBSYSTEMS / f"nvme-subsys{path.group(1)}"
        # the head must be this subsystem's, with the same nsid: a multipath head
        # is shared by every controller of the subsystem
        if _read(subsystem / "subsysnqn") == ctrl.subsystem_nqn and _read(
            SYSFS_BLOCK / head / "nsid"
        ) == str(nsid):
            return str(DEV / head)
    return None


def wait_namespace(target: Target, timeout: float = NAMESPACE_WAIT, nsid: int = NSID) -> str:
    """The namespace's device once it is there and its node exists in /dev."""
    deadline = time.monotonic() + timeout
    while True:
        device = namespace_device(target, nsid)
        if device is not None and os.path.exists(device):
            return device
        if time.monotonic() > deadline:
            ctrl = controller_of(target)
            state = f"its controller {ctrl.name} is {ctrl.state}" if ctrl else "no controller"
            raise Unavailable(
                f"namespace {nsid} of {target.where()} did not appear within {timeout:g} s "
                f"({state})",
                field="publish_context",
            )
        time.sleep(0.05)


def ensure_modules() -> None:
    """Load nvme-tcp (and with it nvme-fabrics) when /dev/nvme-fabrics is missing."""
    if FABRICS_DEVICE.exists():
        return
    try:
        done = subprocess.run(
            ["modprobe", "nvme-tcp"], capture_output=True, text=True, check=False, timeout=60
        )
        why = done.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        why = str(err)
    if not FABRICS_DEVICE.exists():
        raise FailedPrecondition(
            f"this node cannot attach over nvme-tcp: modprobe nvme-tcp: "
            f"{why or 'no /dev/nvme-fabrics'}"
        )


def connect(target: Target, secret: str, timeouts: Timeouts) -> Controller:
    """Connect to `target` authenticating with `secret`; the live controller if there is one.

    A controller of the target that is not live (reconnecting) is left
    to the kernel: it retries with the key it was given until ctrl_loss.
    """
    existing = controller_of(target)
    if existing is not None and existing.state in ALIVE:
        protect_secrets(existing.name)
        return existing
    ensure_modules()
    options = fabrics_options(target, secret, timeouts)
    try:
        fd = os.open(FABRICS_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise FailedPrecondition(f"cannot open {FABRICS_DEVICE}: {err.strerror}") from None
    try:
        os.write(fd, options.encode())
        answer = os.read(fd, 256).decode(errors="replace")
    except OSError as err:
        if err.errno == errno.EALREADY:  # a concurrent connect won: use its controller
            again = controller_of(target)
            if again is not None:
                return again
        raise Unavailable(_refusal(target, err), field="publish_context") from None
    finally:
        os.close(fd)
    instance = _parse_address(answer.strip()).get("instance", "")
    name = f"nvme{instance}"
    if instance.isdigit():
        protect_secrets(name)
    ctrl = _controller(SYSFS_NVME / name) if instance.isdigit() else None
    if ctrl is None or not ctrl.matches(target):
        # the kernel answered for a controller that is gone already (or an odd answer)
        ctrl = controller_of(target)
        if ctrl is None:
            raise Unavailable(
                f"connected to {target.where()} but its controller vanished at once",
                field="publish_context",
            )
    protect_secrets(ctrl.name)
    log.info("connected %s as %s (%s)", target.where(), target.host_nqn, ctrl.name)
    return ctrl


#: the controller's attributes that show a DH-HMAC-CHAP secret (the kernel makes them 0444)
SECRET_ATTRIBUTES = ("dhchap_secret", "dhchap_ctrl_secret")


def protect_secrets(name: str) -> None:
    """Make the controller's secret attributes readable by root only (0600).

    The kernel creates them world-readable with the controller: between the
    connect's write and this chmod (microseconds, on every connect and again
    on re-adoption) a local user could read them; nothing closes that window
    short of a kernel change. A controller gone meanwhile has nothing to hide.
    """
    if not re.fullmatch(r"nvme\d+", name):
        raise ValueError(f"{name!r} is not an nvme controller name")
    for attribute in SECRET_ATTRIBUTES:
        path = SYSFS_NVME / name / attribute
        try:
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
        except FileNotFoundError:
            continue


def _refusal(target: Target, err: OSError) -> str:
    """Why the kernel refused a connect, without any option value but the target's."""
    code = errno.errorcode.get(err.errno or 0, str(err.errno))
    why = {
        errno.ECONNREFUSED: "connection refused (no nvmet port listening there)",
        errno.EKEYREJECTED: "authentication failed (DH-HMAC-CHAP key rejected)",
        errno.EKEYEXPIRED: "authentication failed (DH-HMAC-CHAP)",
        errno.EACCES: "access denied (this host is not allowed, or its key is wrong)",
        errno.EPERM: "access denied (this host is not allowed, or its key is wrong)",
        errno.ETIMEDOUT: "no answer",
        errno.EHOSTUNREACH: "host unreachable",
        errno.ENETUNREACH: "network unreachable",
        errno.EINVAL: "refused (the target does not know this subsystem for this host, "
        "or an option is invalid)",
    }.get(err.errno or 0, err.strerror or "failed")
    return f"could not connect to {target.where()} as {target.host_nqn}: {why} [{code}]"


def _write_attr(path: Path, value: str) -> bool:
    """Write a sysfs trigger; False when the controller is gone."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        os.write(fd, value.encode())
    except OSError as err:
        if err.errno in (errno.ENODEV, errno.ENOENT, errno.EBUSY):
            return False
        raise
    finally:
        os.close(fd)
    return True


def delete_controller(name: str, wait: float = 10.0) -> None:
    """Delete one controller (`nvme disconnect -d <name>`); gone is fine; waits until gone.

    Still there after `wait`: Unavailable, so the caller keeps its record and a
    retry finds the controller again (instead of forgetting a live connection).
    """
    if not re.fullmatch(r"nvme\d+", name):
        raise ValueError(f"{name!r} is not an nvme controller name")
    _write_attr(SYSFS_NVME / name / "delete_controller", "1")
    deadline = time.monotonic() + wait
    while (SYSFS_NVME / name).exists():
        if time.monotonic() >= deadline:
            raise Unavailable(
                f"the nvme controller {name} is still there {wait:g} s after it was deleted; retry"
            )
        time.sleep(0.02)


def disconnect(target: Target) -> list[str]:
    """Delete every controller of the target (its namespace device goes with it)."""
    names = [c.name for c in find_controllers(target)]
    for name in names:
        delete_controller(name)
        log.info("disconnected %s (%s)", target.where(), name)
    return names


def rescan(target: Target) -> None:
    """Ask the target's controllers to rescan namespaces: a grown file shows its new size."""
    for ctrl in find_controllers(target):
        _write_attr(SYSFS_NVME / ctrl.name / "rescan_controller", "1")


def condition(target: Target) -> str:
    """Empty while a controller is live; else what the kernel says, naming the target."""
    ctrl = controller_of(target)
    if ctrl is None:
        return f"no nvme-tcp controller to {target.where()} (the connection is gone)"
    if ctrl.state == "live":
        return ""
    return f"the nvme-tcp controller {ctrl.name} to {target.where()} is {ctrl.state or 'gone'}"
