"""The nbd transport: a volume another node exports over NBD with TLS-PSK.

Two clients, chosen per connect by what the host has:

- the kernel's (`nbd` module, nbd-client, nbdkit: capabilities.kernel_nbd_missing
  is empty): node_agent/transports/nbd_kernel.py, a local nbdkit TLS bridge
  on a unix socket and /dev/nbdN in ioctl mode, with the SINGLE timeouts
  (the kernel waits for a stuck request; a lost owner means EIO, never a
  silent reconnect). The primary device is /dev/nbdN itself; read-only
  views are loop devices on it. Its state is the client's home, `kernel/`.
  A device whose client died is still ours (its claim): it is listed, its
  condition says so, and only a detach frees it for another volume.
- otherwise userspace: `nbdfuse` runs an NBD client (`nbdkit -s nbd …
  tls=require tls-psk=<key file>`) and presents the export as one file on a
  FUSE mount; a loop device on that file is the block device (views too).

Everything above (format, mount, views, stats) is the same as for a
local volume either way.

State per volume, in `<state-dir>/connections/<volume-id>/` (0700):
`record.json` (what was connected, by which client: the connection info,
never the key), then for nbdfuse `nbdfuse.pid`, `nbdfuse.log` and the FUSE
mountpoint `fuse/`, for the kernel client its home `kernel/` (bridge pid
file, logs; its socket is in /run/tessera/nbd, named after that home).
Every process runs in its own session, so it outlives an agent restart;
the restarted agent finds the loop devices on the FUSE file
again (sysfs) and the kernel device by the bridge socket in its resident
client's command line (never by guessing a /dev/nbdN), and the record says
what they came from.

Growing: the NBD protocol fixes an export's size when the client
connects, and both clients keep that size for the connection's lifetime,
so a device sees a grown volume only after it reconnects. `extend`
reconnects when nothing holds the device; while something does, it says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from node_agent import capabilities
from node_agent.pools import Pool
from node_agent.transports import BlockDevice, loops, refuse_reconnect_while_held
from node_agent.transports.nbd_kernel import SINGLE, KernelNbdClient
from tessera.errors import FailedPrecondition, Internal, InvalidArgument, Unavailable
from tessera.ids import check_node_id, check_volume_id, is_volume_id
from tessera.models import Connection, Transport
from tessera.system import blockdev, nbd_kernel, processes

log = logging.getLogger(__name__)

NBDFUSE = "nbdfuse"
FUSERMOUNT = "fusermount3"
NBD_CLIENT = "nbdkit"
FUSE_FILE = "volume"
#: how long nbdfuse gets to connect (TLS handshake included) and mount
CONNECT_TIMEOUT = 20.0
#: how long the export's address gets to answer a health check
PROBE_TIMEOUT = 1.0
#: the record's `client`: which client a volume was connected with
KERNEL = "kernel"
NBDFUSE_CLIENT = "nbdfuse"


class NbdTransport:
    name = Transport.NBD.value

    def __init__(
        self, connections_dir: Path, key_path: Callable[[str], Path], kernel: bool | None = None
    ) -> None:
        self.dir = connections_dir
        self.key_path = key_path
        #: whether to connect with the kernel client; None: ask the host at the first connect
        self._kernel = kernel

    def uses_kernel(self) -> bool:
        if self._kernel is None:
            self._kernel = capabilities.has_kernel_nbd()
        return self._kernel

    @classmethod
    def from_state_dir(
        cls, pools: dict[str, Pool], state_dir: Path, key_path: Callable[[str], Path]
    ) -> NbdTransport:
        return cls(state_dir / "connections", key_path)

    # ---- connect ---------------------------------------------------------------

    def connect(self, volume_id: str, connection: Connection, readonly: bool) -> BlockDevice:
        """The kernel client on the export (its device when it runs already), or nbdfuse
        (unless one from an earlier call still runs) and then a loop."""
        _check_connection(connection)
        key = self.key_path(volume_id)
        if not key.is_file():
            raise FailedPrecondition(
                f"no TLS-PSK key for volume {volume_id} on this node: management hands it over "
                "at ControllerPublishVolume; publish the volume to this node again",
                field="publish_context",
            )
        home = self._home(volume_id)
        client = KERNEL if self.uses_kernel() else NBDFUSE_CLIENT
        before = _read_record(home)
        if before is not None and (
            before != (connection, readonly, _key_digest(key)) or _record_client(home) != client
        ):
            self._stop_clients(volume_id)  # a client of an older publish: its export is closed
        _write_record(home, connection, readonly, key, client)
        if client == KERNEL:
            return self._connect_kernel(volume_id, connection, key, readonly)
        if self._nbdfuse_pid(volume_id) is None:
            self._start_nbdfuse(volume_id, connection, key, readonly)
        return loops.bind(volume_id, str(self._fuse_file(volume_id)), readonly, self.name)

    def _connect_kernel(
        self, volume_id: str, connection: Connection, key: Path, readonly: bool
    ) -> BlockDevice:
        device = self._kernel_client(volume_id).connect(
            connection.host,
            connection.port,
            key,
            connection.psk_identity,
            readonly=readonly,
            timeouts=SINGLE,
            what=f"volume {volume_id} (node {connection.owner_node}'s export)",
        )
        return BlockDevice(volume_id, device, device, readonly, self.name)

    def _start_nbdfuse(
        self, volume_id: str, connection: Connection, key: Path, readonly: bool
    ) -> None:
        home = self._home(volume_id)
        mountpoint = home / "fuse"
        mountpoint.mkdir(mode=0o700, exist_ok=True)
        pid_file = home / "nbdfuse.pid"
        pid_file.unlink(missing_ok=True)
        argv = [
            NBDFUSE,
            "-P",
            str(pid_file),
            *(["-r"] if readonly else []),
            str(mountpoint / FUSE_FILE),
            "--command",
            "nbdkit",
            "-s",
            "--exit-with-parent",
            "nbd",
            f"hostname={connection.host}",
            f"port={connection.port}",
            "tls=require",
            f"tls-psk={key}",
            f"tls-username={connection.psk_identity}",
        ]
        proc = processes.start_detached(argv, home / "nbdfuse.log")
        self._wait_mounted(volume_id, connection, proc)
        log.info(
            "connected volume %s to node %s's export at %s:%d%s",
            volume_id,
            connection.owner_node,
            connection.host,
            connection.port,
            " (read-only)" if readonly else "",
        )

    def _wait_mounted(
        self, volume_id: str, connection: Connection, proc: subprocess.Popen[bytes]
    ) -> None:
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while time.monotonic() < deadline:
            if self._nbdfuse_pid(volume_id) is not None and self._fuse_file(volume_id).exists():
                return
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        self._unmount(volume_id)
        tail = processes.log_tail(self._home(volume_id) / "nbdfuse.log")
        raise Unavailable(
            f"could not connect volume {volume_id} to node {connection.owner_node}'s export at "
            f"{connection.host}:{connection.port}: {tail or 'no answer'}",
            field="publish_context",
        )

    def add_view(self, primary: BlockDevice, view_key: str) -> BlockDevice:
        return loops.bind(primary.volume_id, primary.backing, True, self.name, view_key)

    # ---- state -----------------------------------------------------------------

    def devices(self) -> list[BlockDevice]:
        """nbdfuse's loop devices, kernel devices (found by their bridge sockets) and the
        views on those (loop devices on /dev/nbdN)."""
        kernel = self._kernel_devices()
        found = [
            BlockDevice(v, d, d, nbd_kernel.read_only(d), self.name) for d, v in kernel.items()
        ]
        for device in loops.bound(lambda b: kernel.get(b) or self._volume_of(b), self.name):
            # on a kernel device only a view is ours (its primary is the device itself)
            if device.view_key or device.backing not in kernel:
                found.append(device)
        return found

    def _kernel_devices(self) -> dict[str, str]:
        """{/dev/nbdN: volume id} of every kernel device whose client serves the bridge
        socket of one of our homes (`<connections>/<volume-id>/kernel/`), and of every
        device one of them claimed whose client died (it stays ours until detached)."""
        connected = nbd_kernel.connected()
        claims = nbd_kernel.claims()
        if not (connected or claims) or not self.dir.is_dir():
            return {}
        homes = {
            home.name: self._kernel_client(home.name)
            for home in self.dir.iterdir()
            if is_volume_id(home.name)
        }
        by_socket = {str(c.socket): v for v, c in homes.items()}
        by_home = {os.path.abspath(c.home): v for v, c in homes.items()}
        found = {d: v for d, o in claims.items() if (v := by_home.get(o)) is not None}
        for device, args in connected.items():
            found.update((device, by_socket[a]) for a in args if a in by_socket)
        return found

    def connection_of(self, device: BlockDevice) -> Connection:
        record = _read_record(self.dir / device.volume_id)
        if record is None:
            raise Internal(f"volume {device.volume_id} has an nbd device but no record")
        return record[0]

    def is_current(self, device: BlockDevice, connection: Connection) -> bool:
        """Made from this publish: the same export endpoint, and the key it was started
        with is the one delivered for this publish."""
        record = _read_record(self.dir / device.volume_id)
        if record is None:
            return False
        had, _, digest = record
        if had.endpoint() != connection.endpoint():
            return False
        # a record from before key digests were kept can only be judged by its endpoint
        return not digest or digest == _key_digest(self.key_path(device.volume_id))

    def connections(self) -> dict[str, float]:
        """Every volume with a record (devices or not): when its record was written."""
        if not self.dir.is_dir():
            return {}
        found = {}
        for entry in self.dir.iterdir():
            record = entry / "record.json"
            if is_volume_id(entry.name) and record.is_file():
                found[entry.name] = record.stat().st_mtime
        return found

    def condition(self, device: BlockDevice, probe: bool = False) -> str:
        record = _read_record(self.dir / device.volume_id)
        if record is None:
            return "the record of this remote connection is gone"
        connection = record[0]
        where = f"node {connection.owner_node}'s export at {connection.host}:{connection.port}"
        if _record_client(self.dir / device.volume_id) == KERNEL:
            why = self._kernel_client(device.volume_id).condition()
            if why:
                return f"the connection to {where} is gone ({why})"
        elif self._nbdfuse_pid(device.volume_id) is None:
            return f"the connection to {where} is gone (its NBD client exited)"
        if not probe:
            return ""
        try:
            with socket.create_connection((connection.host, connection.port), PROBE_TIMEOUT):
                pass
        except OSError as exc:
            return f"cannot reach {where}: {exc.strerror or exc}"
        return ""

    def size_bytes(self, device: BlockDevice) -> int:
        return blockdev.size_bytes(device.path)

    # ---- disconnect / extend -----------------------------------------------------

    def release(self, device: BlockDevice) -> None:
        """A loop device is unbound; a kernel primary is disconnected (the record stays
        until `disconnect`)."""
        if _is_kernel_device(device.path):
            self._kernel_client(device.volume_id).disconnect()
        else:
            loops.unbind(device)

    def disconnect(self, volume_id: str) -> None:
        """Disconnect the kernel client, or unmount the FUSE file (nbdfuse then exits),
        then drop the record."""
        check_volume_id(volume_id)
        home = self.dir / volume_id
        if not home.is_dir():
            return
        self._stop_clients(volume_id)
        for name in ("record.json", "nbdfuse.pid", "nbdfuse.log"):
            (home / name).unlink(missing_ok=True)
        for directory in (home / "fuse", home):
            try:
                directory.rmdir()  # never recursive: a mount under it must stay visible
            except FileNotFoundError:
                pass
        log.info("disconnected volume %s", volume_id)

    def _stop_clients(self, volume_id: str) -> None:
        """Whichever client runs (a record's client may have changed since); a kernel
        device still in use is refused, never pulled from under its user."""
        if (self.dir / volume_id / KERNEL).is_dir():
            self._kernel_client(volume_id).disconnect_unless_held(f"volume {volume_id}")
        self._unmount(volume_id)

    def _unmount(self, volume_id: str) -> None:
        mountpoint = self._home(volume_id) / "fuse"
        pid = self._nbdfuse_pid(volume_id)
        if os.path.ismount(mountpoint):
            done = subprocess.run(
                [FUSERMOUNT, "-u", str(mountpoint)], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                raise FailedPrecondition(
                    f"volume {volume_id}: cannot unmount its NBD client at {mountpoint}: "
                    f"{done.stderr.strip()}; something still uses it",
                    field="volume_id",
                )
        if pid is not None:
            # its NBD client (nbdkit -s) follows it on its own, but not at once:
            # wait for both, so a detach that answered has left nothing running
            clients = processes.children(pid)
            processes.terminate(pid, NBDFUSE)
            for client in clients:
                processes.terminate(client, NBD_CLIENT)

    def extend(self, device: BlockDevice, min_size_bytes: int = 0) -> None:
        """Reconnect when a size above the device's is asked for; refused while held.

        Without `min_size_bytes` (every stage, views, the owner's refresh)
        there is nothing cheap to do: the device keeps the size its client
        connected with, so asking the export would cost a TLS handshake.
        """
        kernel = _is_kernel_device(device.backing)
        if device.view_key or min_size_bytes <= blockdev.size_bytes(device.path):
            if not kernel:
                loops.refresh_if_grown(device)
            return
        # every device on the client goes with a reconnect: the views too
        views = [d for d in self.devices() if d.volume_id == device.volume_id and d != device]
        client = "the kernel nbd client" if kernel else "nbdfuse"
        refuse_reconnect_while_held(device, views, f"is attached over {client}")
        connection = self.connection_of(device)
        self.release(device)
        self._stop_clients(device.volume_id)
        self.connect(device.volume_id, connection, device.readonly)

    # ---- paths -------------------------------------------------------------------

    def _home(self, volume_id: str) -> Path:
        """`<connections>/<volume-id>/`, made 0700 (the FUSE file itself is mode 0666)."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        home = self.dir / check_volume_id(volume_id)
        home.mkdir(mode=0o700, exist_ok=True)
        return home

    def _fuse_file(self, volume_id: str) -> Path:
        return self.dir / volume_id / "fuse" / FUSE_FILE

    def _kernel_client(self, volume_id: str) -> KernelNbdClient:
        return KernelNbdClient(self.dir / check_volume_id(volume_id) / KERNEL)

    def _volume_of(self, backing: str) -> str | None:
        path = Path(backing)
        if path.name != FUSE_FILE or path.parent.name != "fuse":
            return None
        home = path.parent.parent
        return home.name if home.parent == self.dir and is_volume_id(home.name) else None

    def _nbdfuse_pid(self, volume_id: str) -> int | None:
        marker = str(self.dir / volume_id / "fuse" / FUSE_FILE)
        return processes.running(self.dir / volume_id / "nbdfuse.pid", NBDFUSE, [marker])


def _check_connection(connection: Connection) -> None:
    if not connection.host or not connection.port:
        raise InvalidArgument(
            "publish_context of an nbd volume needs host and port (from ControllerPublishVolume)",
            field="publish_context",
        )
    if any(c.isspace() or c in "=/" for c in connection.host):
        raise InvalidArgument(
            f"publish_context host {connection.host[:80]!r} is not a host name or address",
            field="publish_context",
        )
    check_node_id(connection.psk_identity, "publish_context.pskIdentity")


def _key_digest(key: Path) -> str:
    """Which key a client was started with, without keeping the key: a new publish to
    this node (after an unpublish or a fence) brings a new key, maybe on the same port."""
    try:
        return hashlib.sha256(key.read_bytes()).hexdigest()[:16]
    except OSError:
        return ""


def _is_kernel_device(path: str) -> bool:
    return path.startswith("/dev/nbd")


def _write_record(
    home: Path, connection: Connection, readonly: bool, key: Path, client: str
) -> None:
    data = {
        "connection": connection.model_dump(mode="json"),
        "readonly": readonly,
        "key_digest": _key_digest(key),
        "client": client,
    }
    tmp = home / "record.json.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, home / "record.json")


def _read_record(home: Path) -> tuple[Connection, bool, str] | None:
    """(connection, readonly, key digest) of what was connected; None when unreadable."""
    try:
        data = json.loads((home / "record.json").read_text())
        return (
            Connection.model_validate(data["connection"]),
            bool(data["readonly"]),
            str(data.get("key_digest", "")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _record_client(home: Path) -> str:
    """Which client the record says connected the volume (records from before the kernel
    client existed were all nbdfuse)."""
    try:
        data = json.loads((home / "record.json").read_text())
    except (OSError, ValueError):
        return NBDFUSE_CLIENT
    client = data.get("client") if isinstance(data, dict) else None
    return client if client in (KERNEL, NBDFUSE_CLIENT) else NBDFUSE_CLIENT
