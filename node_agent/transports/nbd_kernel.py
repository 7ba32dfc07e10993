"""One kernel nbd device (/dev/nbdN) on one remote NBD export, through a local TLS bridge.

The owner serves the volume (or a composed volume's leg) with nbdkit,
TLS-PSK required (node_agent/exports.py). The kernel's nbd client cannot
do TLS and nbd-client 3.24 has no TLS-PSK, so the consumer runs a bridge:

    nbdkit -f --unix /run/tessera/nbd/<digest of home>.sock -P <home>/bridge.pid [-r]
           nbd hostname=<host> port=<port> tls=require tls-psk=<key file> tls-username=<identity>
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

The bridge never reconnects to the owner (no retry filter), for
durability: an owner that crashed lost the writes it had not flushed; a
reconnecting bridge would re-send the consumer's FLUSH to the rebooted
owner, it would succeed, and the consumer's filesystem would commit data
that is gone. So a lost connection (the owner's nbdkit died: reset) fails
every request with EIO, loudly, until the volume is attached again, as
nbdfuse always did. (The retry filter also retried ENOSPC and EIO for
minutes, and made the bridge serialize requests; without it the nbd
plugin is `parallel`.)

Timeouts (`NbdTimeouts`, one place):
- SINGLE (a one-leg volume, a raid0 leg): no kernel request timeout (the
  kernel only warns about a stuck request and keeps waiting): a network
  partition that heals resumes on the same TCP connection, nothing lost.
- MIRROR (a raid1/raid10 leg): a request stuck 30 s fails (30 s, not 5 s:
  TCG in CI is slow) so md fails the leg and carries on with the others.

A device is picked with a claim (tessera/system/nbd_kernel.py, "Claims"),
holding `home`; it stays until `disconnect` has detached the device, even
when the client died: `claimed()` finds such a dead device, which must
never go to another volume while a pod may still have its node.

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
from tessera.system import blockdev, nbd_kernel, processes

log = logging.getLogger(__name__)

NBDKIT = "nbdkit"
#: where the bridges listen: short paths (a unix socket path must fit 107 bytes)
SOCKET_DIR = nbd_kernel.RUN_DIR
BRIDGE_PID = "bridge.pid"
BRIDGE_LOG = "bridge.log"
CLIENT_LOG = "client.log"
FILES = (BRIDGE_PID, BRIDGE_LOG, CLIENT_LOG)
#: how long the bridge gets to listen, and then the client to connect (TLS handshake
#: with the owner included); generous: TCG in CI is slow
CONNECT_TIMEOUT = 30.0
#: how often a connect picks another device when something outside tessera took the one
#: it claimed (claims keep tessera's own agents apart)
DEVICE_ATTEMPTS = 4


@dataclass(frozen=True)
class NbdTimeouts:
    """kernel_timeout: seconds before a stuck request fails (0: never, the kernel warns)."""

    kernel_timeout: int


#: a whole volume (or a raid0 leg): a stuck request waits (a partition may heal)
SINGLE = NbdTimeouts(kernel_timeout=0)
#: one mirror leg: fail so md degrades and carries on
MIRROR = NbdTimeouts(kernel_timeout=30)


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
) -> list[str]:
    return [
        NBDKIT,
        "-f",  # foreground: start_detached's pid is the bridge, in its own session
        "--unix",
        str(socket_path(home)),
        "-P",
        str(home / BRIDGE_PID),
        *(["-r"] if readonly else []),
        "nbd",
        f"hostname={host}",
        f"port={port}",
        "tls=require",
        f"tls-psk={key_file}",
        f"tls-username={identity}",
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

    def claimed(self) -> str | None:
        """The /dev/nbdN this home holds a claim on, its client alive or dead."""
        owner = self._owner()
        return next((d for d, o in nbd_kernel.claims().items() if o == owner), None)

    def bridge_pid(self) -> int | None:
        return processes.running(self.home / BRIDGE_PID, NBDKIT, [str(self.socket)])

    def condition(self) -> str:
        """ "" when the device is connected through a running bridge, else why not."""
        if self.device() is None:
            dead = self.claimed()
            if dead is not None:
                return f"its kernel nbd client exited ({dead} fails all I/O until detached)"
            return "its kernel nbd client is not connected"
        bridge = self.bridge_pid()
        if bridge is None:
            return "its local TLS bridge (nbdkit) to the owner exited"
        if processes.established_tcp(bridge) == 0:
            # the owner reset or closed it (died, rebooted): the bridge never reconnects
            return "its TLS bridge lost the connection to the owner (I/O fails until reattached)"
        return ""

    def _owner(self) -> str:
        """What a claim holds: the home, spelt one way."""
        return os.path.abspath(self.home)

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
        """The connected /dev/nbdN; an existing one is returned as it is (idempotent).
        A failure of any kind leaves nothing behind (no bridge, claim or home)."""
        found = self.device()
        if found is not None:
            return found
        self._check_host(what)
        # a dead device of ours, a bridge whose client is gone (it may hold an older
        # publish's key): cleared first, unless the dead device is still in use
        self.disconnect_unless_held(f"cannot connect {what}")
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        where = f"{host}:{port}"
        try:
            self._start_bridge(bridge_argv(self.home, host, port, key_file, identity, readonly))
            device = self._start_client(readonly, timeouts)
        except Unavailable as exc:
            tail = self._tails()
            self.disconnect()
            raise Unavailable(
                f"could not connect {what} to the export at {where} over the kernel nbd "
                f"client: {exc}{f' ({tail})' if tail else ''}",
                field="publish_context",
            ) from exc
        except BaseException:
            self.disconnect()
            raise
        log.info("connected %s to the export at %s as %s%s", what, where, device,
                 " (read-only)" if readonly else "")  # fmt: skip
        return device

    def disconnect_unless_held(self, what: str) -> None:
        """`disconnect`, refused while the device (alive, or dead and still claimed) is in
        use: never pulled from under its user, and a dead one must fail loudly for its
        user, never come back under it reconnected. `what` starts the refusal."""
        alive = self.device()
        device = alive or self.claimed()
        held = blockdev.holders(device) if device is not None else []
        if held:
            raise FailedPrecondition(
                f"{what}: its kernel nbd device {device}{'' if alive else ' (its client died)'}"
                f" is in use ({'; '.join(held)}); release it first",
                field="volume_id",
            )
        self.disconnect()

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
        """Claim a device (the claims' lock is not held past that: a TLS handshake with an
        unreachable owner must not stall every other attach), then connect it. On an
        exception the caller's `disconnect` detaches and releases what is claimed."""
        owner = self._owner()
        for _ in range(DEVICE_ATTEMPTS):
            device = nbd_kernel.claim_device(owner)
            proc = processes.start_detached(
                client_argv(self.home, device, readonly, timeouts), self.home / CLIENT_LOG
            )
            if self._wait_client(device, proc):
                return device
            # something outside tessera connected it meanwhile: leave it, pick another
            taken = nbd_kernel.client_pid(device) is not None
            if not taken:
                nbd_kernel.detach(device, None)  # reset whatever ours set before failing
            nbd_kernel.release_claim(device, owner)
            if not taken:
                break  # failed on a device nobody else took: not a race, a failure
        raise Unavailable("nbd-client could not connect")

    def _wait_client(self, device: str, proc: subprocess.Popen[bytes]) -> bool:
        """True once the kernel shows `proc` as `device`'s client and the export's size
        (the pid appears a moment before the size); False when it exited. Sysfs has the
        init pid namespace's pid: an agent in a container compares that one."""
        deadline = time.monotonic() + CONNECT_TIMEOUT
        want = nbd_kernel.global_pid(proc.pid)
        while (
            want is None
            or nbd_kernel.client_pid(device) != want
            or nbd_kernel.size_bytes(device) == 0
        ):
            if proc.poll() is not None:
                return False
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait(timeout=5)
                raise Unavailable(f"nbd-client did not connect {device} in {CONNECT_TIMEOUT:.0f}s")
            want = want or nbd_kernel.global_pid(proc.pid)
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
        """Detach the device (alive, or claimed with its client dead), stop the bridge,
        then drop the claim and remove the files and `home` (never recursively); nothing
        there is fine. Whether the device is still used is the caller's to check."""
        clients = nbd_kernel.clients()
        marker = str(self.socket)
        device = next((d for d, (_, args) in clients.items() if marker in args), None)
        claimed = self.claimed()
        if device is not None:
            nbd_kernel.detach(device, clients[device][0] if device in clients else None)
        if claimed is not None and claimed != device and claimed not in clients:
            # our client died; a live client there now is another's (outside tessera)
            nbd_kernel.detach(claimed, None)
        self._stop_processes()
        if claimed is not None:
            nbd_kernel.release_claim(claimed, self._owner())  # only once it is detached
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
        programs = (nbd_kernel.NBD_CLIENT, NBDKIT)
        for pid in processes.matching(
            lambda args: os.path.basename(args[0]) in programs and marker in args
        ):
            # terminate signals only while the pid is still that program
            processes.terminate(pid, os.path.basename((processes.cmdline(pid) or [""])[0]))
