"""One kernel nbd device (/dev/nbdN) on one remote NBD export, through a local TLS bridge.

The owner serves the volume (or a composed volume's leg) with nbdkit,
TLS-PSK required (node_agent/exports.py). The kernel's nbd client cannot
do TLS and nbd-client 3.24 has no TLS-PSK, so the consumer runs a bridge:

    nbdkit -f --unix /run/tessera/nbd/<digest of home>.sock -P <home>/bridge.pid [-r]
           [--filter=retry] nbd hostname=<host> port=<port> tls=require
           tls-psk=<key file> tls-username=<identity> [retries=… retry-delay=… retry-exponential=no]
    nbd-client -unix /run/tessera/nbd/<digest>.sock /dev/nbdN -nonetlink -nofork [-timeout T]
           -b 512 -N '' [-readonly]

The bridge is the TLS-PSK client of the owner's export and serves plain
NBD on a unix socket in /run/tessera/nbd (0700: nobody else can reach the
volume through it), named by a digest of `home`: a unix socket path must
fit 107 bytes, which `<state-dir>/composed/<volume-id>/nbd-leg-N/` need
not. nbd-client hands that socket to the kernel and stays resident (ioctl
mode), so the kernel shows its pid in /sys/block/nbdN/pid and its command
line holds the socket path, unique per `home` and so per (volume, leg):
that is how the device is found again after an agent restart, never by
guessing a /dev/nbdN. Both run in their own session (they outlive the
agent). `-b 512`: the smallest sector, so any filesystem made over loop,
nbdfuse or nvme-tcp mounts on it.

Timeouts (`NbdTimeouts`, one place):
- SINGLE (a one-leg volume, a raid0 leg): no kernel request timeout (the
  kernel only warns about a stuck request and keeps waiting) and the bridge
  reconnects to the owner for ~10 minutes (retry filter: 300 x 2 s), like
  nvme's ctrl_loss_tmo 600: an owner that reboots serves the export again on
  the same port and I/O carries on.
- MIRROR (a raid1/raid10 leg): a request stuck 30 s fails (30 s, not 5 s:
  TCG in CI is slow) and the bridge never retries: the owner gone means
  errors at once, md fails the leg and carries on with the others.

Files in `home`: bridge.pid, bridge.log, client.log. Logs hold
paths and addresses, never the key (nbdkit reads it from the key file).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tessera.errors import FailedPrecondition, Unavailable
from tessera.system import nbd_kernel, processes

log = logging.getLogger(__name__)

NBDKIT = "nbdkit"
#: where the bridges listen: short paths (a unix socket path must fit 107 bytes)
SOCKET_DIR = Path("/run/tessera/nbd")
BRIDGE_PID = "bridge.pid"
BRIDGE_LOG = "bridge.log"
CLIENT_LOG = "client.log"
FILES = (BRIDGE_PID, BRIDGE_LOG, CLIENT_LOG)
#: how long the bridge gets to listen, and then the client to connect (TLS handshake
#: with the owner included); generous: TCG in CI is slow
CONNECT_TIMEOUT = 30.0
#: how often a connect picks another device when another process took the one it picked
DEVICE_ATTEMPTS = 4


@dataclass(frozen=True)
class NbdTimeouts:
    """kernel_timeout: seconds before a stuck request fails (0: never, the kernel warns);
    retries x retry_delay: how long the bridge reconnects to a lost owner (0: not at all)."""

    kernel_timeout: int
    retries: int
    retry_delay: int


#: a whole volume (or a raid0 leg): wait for the owner rather than fail I/O
SINGLE = NbdTimeouts(kernel_timeout=0, retries=300, retry_delay=2)
#: one mirror leg: fail so md degrades and carries on
MIRROR = NbdTimeouts(kernel_timeout=30, retries=0, retry_delay=0)


def socket_path(home: Path) -> Path:
    """The bridge socket of the client whose state is in `home`: one per home, short."""
    digest = hashlib.sha256(os.fsencode(os.path.abspath(home))).hexdigest()[:32]
    return SOCKET_DIR / f"{digest}.sock"


def bridge_argv(
    home: Path,
    host: str,
    port: int,
    key_file: Path,
    identity: str,
    readonly: bool,
    timeouts: NbdTimeouts,
) -> list[str]:
    retry = timeouts.retries > 0
    return [
        NBDKIT,
        "-f",  # foreground: start_detached's pid is the bridge, in its own session
        "--unix",
        str(socket_path(home)),
        "-P",
        str(home / BRIDGE_PID),
        *(["-r"] if readonly else []),
        *(["--filter=retry"] if retry else []),
        "nbd",
        f"hostname={host}",
        f"port={port}",
        "tls=require",
        f"tls-psk={key_file}",
        f"tls-username={identity}",
        *(
            [
                f"retries={timeouts.retries}",
                f"retry-delay={timeouts.retry_delay}",
                "retry-exponential=no",
            ]
            if retry
            else []
        ),
    ]


def client_argv(home: Path, device: str, readonly: bool, timeouts: NbdTimeouts) -> list[str]:
    return [
        nbd_kernel.NBD_CLIENT,
        "-unix",
        str(socket_path(home)),
        nbd_kernel.check_device(device),
        "-nonetlink",  # ioctl mode: the client stays, its pid is in sysfs (how we find it)
        "-nofork",
        *(["-timeout", str(timeouts.kernel_timeout)] if timeouts.kernel_timeout else []),
        "-b",
        str(nbd_kernel.SECTOR),
        "-N",
        "",
        *(["-readonly"] if readonly else []),
    ]


class KernelNbdClient:
    """The kernel nbd device of one remote export; all state in `home` (0700)."""

    def __init__(self, home: Path) -> None:
        self.home = home

    @property
    def socket(self) -> Path:
        return socket_path(self.home)

    # ---- state -----------------------------------------------------------------

    def device(self) -> str | None:
        """The /dev/nbdN whose resident client serves our bridge socket; None when none."""
        return nbd_kernel.find(str(self.socket))

    def bridge_pid(self) -> int | None:
        return processes.running(self.home / BRIDGE_PID, NBDKIT, [str(self.socket)])

    def condition(self) -> str:
        """ "" when the device is connected through a running bridge, else why not."""
        if self.device() is None:
            return "its kernel nbd client is not connected (it exited)"
        if self.bridge_pid() is None:
            return "its local TLS bridge (nbdkit) to the owner exited"
        return ""

    # ---- connect ---------------------------------------------------------------

    def connect(
        self,
        host: str,
        port: int,
        key_file: Path,
        identity: str,
        *,
        readonly: bool,
        timeouts: NbdTimeouts,
        what: str,
    ) -> str:
        """The connected /dev/nbdN; an existing one is returned as it is (idempotent)."""
        found = self.device()
        if found is not None:
            return found
        self._check_host(what)
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        self._stop_processes()  # a bridge whose client is gone may hold an older publish's key
        where = f"{host}:{port}"
        try:
            self._start_bridge(
                bridge_argv(self.home, host, port, key_file, identity, readonly, timeouts)
            )
            device = self._start_client(readonly, timeouts)
        except Unavailable as exc:
            tail = self._tails()
            self.disconnect()
            raise Unavailable(
                f"could not connect {what} to the export at {where} over the kernel nbd "
                f"client: {exc}{f' ({tail})' if tail else ''}",
                field="publish_context",
            ) from exc
        log.info("connected %s to the export at %s as %s%s", what, where, device,
                 " (read-only)" if readonly else "")  # fmt: skip
        return device

    def _check_host(self, what: str) -> None:
        missing = [t for t in (NBDKIT, nbd_kernel.NBD_CLIENT) if not shutil.which(t)]
        if missing:
            raise FailedPrecondition(
                f"cannot connect {what} over the kernel nbd client: "
                f"{', '.join(missing)} not installed on this node"
            )
        nbd_kernel.ensure_module()

    def _start_bridge(self, argv: list[str]) -> None:
        SOCKET_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(SOCKET_DIR, 0o700)
        self.socket.unlink(missing_ok=True)
        (self.home / BRIDGE_PID).unlink(missing_ok=True)
        proc = processes.start_detached(argv, self.home / BRIDGE_LOG)
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while self.bridge_pid() is None or not self.socket.exists():
            if proc.poll() is not None:
                raise Unavailable(f"its local bridge (nbdkit) exited ({proc.returncode})")
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"its local bridge (nbdkit) did not listen in {CONNECT_TIMEOUT:.0f}s"
                )
            time.sleep(0.02)

    def _start_client(self, readonly: bool, timeouts: NbdTimeouts) -> str:
        for _ in range(DEVICE_ATTEMPTS):
            with nbd_kernel.FIND_LOCK:
                device = nbd_kernel.free_device()
                argv = client_argv(self.home, device, readonly, timeouts)
                proc = processes.start_detached(argv, self.home / CLIENT_LOG)
                if self._wait_client(device, proc):
                    return device
            if nbd_kernel.client_pid(device) is None:
                break  # failed on a device nobody else took: not a race, a failure
        raise Unavailable("nbd-client could not connect")

    def _wait_client(self, device: str, proc: subprocess.Popen[bytes]) -> bool:
        """True once the kernel shows `proc` as `device`'s client and the export's size
        (the pid appears a moment before the size); False when it exited."""
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while nbd_kernel.client_pid(device) != proc.pid or nbd_kernel.size_bytes(device) == 0:
            if proc.poll() is not None:
                return False
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait(timeout=5)
                raise Unavailable(f"nbd-client did not connect {device} in {CONNECT_TIMEOUT:.0f}s")
            time.sleep(0.02)
        return True

    def _tails(self) -> str:
        parts = []
        for name, label in ((BRIDGE_LOG, "bridge"), (CLIENT_LOG, "nbd-client")):
            tail = processes.log_tail(self.home / name, 3)
            if tail:
                parts.append(f"{label}: {tail}")
        return "; ".join(parts)

    # ---- disconnect --------------------------------------------------------------

    def disconnect(self) -> None:
        """Detach the device, stop the bridge, remove the files and `home` (never
        recursively); nothing there is fine."""
        device = self.device()
        if device is not None:
            nbd_kernel.detach(device, nbd_kernel.client_pid(device))
        self._stop_processes()
        self.socket.unlink(missing_ok=True)
        for name in FILES:
            (self.home / name).unlink(missing_ok=True)
        try:
            self.home.rmdir()
        except FileNotFoundError:
            pass

    def _stop_processes(self) -> None:
        """Every nbd-client and bridge on our socket (a pid file is not trusted to find a
        process that crashed before writing one)."""
        marker = str(self.socket)
        for program in (nbd_kernel.NBD_CLIENT, NBDKIT):
            for pid in processes.matching(
                lambda args, p=program: os.path.basename(args[0]) == p and marker in args  # type: ignore[misc]
            ):
                processes.terminate(pid, program)
