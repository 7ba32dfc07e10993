"""The nvme-tcp transport: another node's volume as a kernel NVMe/TCP namespace.

The owner serves the volume file as namespace 1 of the nvmet subsystem
`subsystem_nqn(volume, owner)` (node_agent/nvme_exports.py); this node
connects as the host `host_nqn(this node, volume)`, authenticating with
DH-HMAC-CHAP using the attachment's key (the same key file, key_path(volume),
that an nbd attachment uses: `identity:hexkey`, the identity being this
node's id as management issued it). The namespace's block device
(/dev/nvmeXnY) is the volume's primary device; read-only views are loop
devices on it. Single-leg policy: the kernel waits up to 600 s for a lost
target and never fails I/O early (tessera.system.nvme_host.SINGLE_LEG).

State per volume: `<state-dir>/nvme-connections/<volume-id>.json` (the
connection, the key's digest, never the key), written before the connect,
so a crash in between leaves a record that `connections()` lists and
`disconnect` cleans. The kernel holds the connection itself, so an agent
restart changes nothing: the restarted agent finds the device again from
the record's (subsystem NQN, host NQN) in sysfs.

Growing: the owner grows the file; `extend` asks the controller to rescan,
and the namespace shows the new size online (no reconnect, unlike nbdfuse).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from node_agent.pools import Pool
from node_agent.transports import BlockDevice, loops
from tessera.errors import FailedPrecondition, Internal, InvalidArgument, Unavailable
from tessera.ids import check_node_id, check_volume_id, is_volume_id
from tessera.models import Connection, Transport
from tessera.nvme_names import dhchap_secret, host_id, host_nqn, subsystem_nqn
from tessera.system import blockdev, nvme_host, nvmet

log = logging.getLogger(__name__)

#: how long a rescan gets to show the size asked for
GROW_WAIT = 10.0


def read_key(key_file: Path, volume_id: str) -> tuple[str, str]:
    """(this node's identity, DH-HMAC-CHAP secret) from the attachment's key file.

    Shared with the composed transport's remote legs. Errors name the
    volume, never the key.
    """
    try:
        identity, _, key = key_file.read_text().strip().partition(":")
    except FileNotFoundError:
        raise FailedPrecondition(
            f"no key for volume {volume_id} on this node: management hands it over at "
            "ControllerPublishVolume; publish the volume to this node again",
            field="publish_context",
        ) from None
    try:
        check_node_id(identity, "key identity")
        return identity, dhchap_secret(key)
    except (ValueError, InvalidArgument):
        raise FailedPrecondition(
            f"the key file of volume {volume_id} on this node is not `node:hexkey` "
            "(256-bit); publish the volume to this node again",
            field="publish_context",
        ) from None


def target_of(volume_id: str, owner: str, host: str, port: int, client: str) -> nvme_host.Target:
    """The nvme Target of `owner`'s leg of `volume_id`, connected as `client`."""
    nqn = host_nqn(client, volume_id)
    return nvme_host.Target(
        host=nvmet.resolve(host),
        port=port,
        subsystem_nqn=subsystem_nqn(volume_id, owner),
        host_nqn=nqn,
        host_id=host_id(nqn),
    )


class NvmeTcpTransport:
    name = Transport.NVME_TCP.value

    def __init__(self, directory: Path, key_path: Callable[[str], Path]) -> None:
        self.dir = directory
        self.key_path = key_path

    @classmethod
    def from_state_dir(
        cls, pools: dict[str, Pool], state_dir: Path, key_path: Callable[[str], Path]
    ) -> NvmeTcpTransport:
        return cls(state_dir / "nvme-connections", key_path)

    # ---- connect ---------------------------------------------------------------

    def connect(self, volume_id: str, connection: Connection, readonly: bool) -> BlockDevice:
        """Connect (or find the controller a former call made) and wait for namespace 1."""
        check_volume_id(volume_id)
        if readonly:
            raise InvalidArgument(
                "readonly: an nvme-tcp attachment is read-write (nvmet has no read-only "
                "host); read-only attachments come over nbd",
                field="readonly",
            )
        _check_connection(volume_id, connection)
        identity, secret = read_key(self.key_path(volume_id), volume_id)
        target = target_of(
            volume_id, connection.owner_node, connection.host, connection.port, identity
        )
        digest = _key_digest(self.key_path(volume_id))
        before = self._record(volume_id)
        if before is not None and (before[0] != connection or before[1] != digest):
            self._disconnect_record(volume_id)  # an older publish: its export is closed
        self._write_record(volume_id, connection, digest, identity)
        try:
            nvme_host.connect(target, secret, nvme_host.SINGLE_LEG)
            device = nvme_host.wait_namespace(target)
        except Exception:
            if before is None:  # a first attach that failed leaves nothing behind
                self.disconnect(volume_id)
            raise
        log.info(
            "connected volume %s to node %s's nvme-tcp export at %s:%d as %s",
            volume_id,
            connection.owner_node,
            target.host,
            target.port,
            device,
        )
        return BlockDevice(volume_id, device, device, False, self.name)

    def add_view(self, primary: BlockDevice, view_key: str) -> BlockDevice:
        return loops.bind(primary.volume_id, primary.path, True, self.name, view_key)

    # ---- state -----------------------------------------------------------------

    def _targets(self) -> dict[str, nvme_host.Target]:
        found = {}
        for volume_id in self.connections():
            target = self._target(volume_id)
            if target is not None:
                found[volume_id] = target
        return found

    def devices(self) -> list[BlockDevice]:
        """Primaries from sysfs (by each record's NQNs), views from the loop devices on them."""
        primaries = {}
        for volume_id, target in self._targets().items():
            for ctrl in nvme_host.find_controllers(target):
                nvme_host.protect_secrets(ctrl.name)  # made by an agent that did not
            device = nvme_host.namespace_device(target)
            if device is not None:
                primaries[device] = BlockDevice(volume_id, device, device, False, self.name)
        views = loops.bound(lambda b: primaries[b].volume_id if b in primaries else None, self.name)
        return list(primaries.values()) + [v for v in views if v.view_key]

    def connection_of(self, device: BlockDevice) -> Connection:
        record = self._record(device.volume_id)
        if record is None:
            raise Internal(f"volume {device.volume_id} has an nvme-tcp device but no record")
        return record[0]

    def is_current(self, device: BlockDevice, connection: Connection) -> bool:
        record = self._record(device.volume_id)
        return (
            record is not None
            and record[0].endpoint() == connection.endpoint()
            and record[0].subsystem_nqn == connection.subsystem_nqn
            and record[1] == _key_digest(self.key_path(device.volume_id))
        )

    def connections(self) -> dict[str, float]:
        if not self.dir.is_dir():
            return {}
        found = {}
        for entry in self.dir.glob("*.json"):
            if is_volume_id(entry.stem):
                found[entry.stem] = entry.stat().st_mtime
        return found

    def condition(self, device: BlockDevice, probe: bool = False) -> str:
        target = self._target(device.volume_id)
        if target is None:
            return "the record of this remote connection is gone"
        return nvme_host.condition(target)

    def size_bytes(self, device: BlockDevice) -> int:
        return blockdev.size_bytes(device.path)

    # ---- disconnect / extend -----------------------------------------------------

    def release(self, device: BlockDevice) -> None:
        """A view's loop device goes; the namespace itself goes with `disconnect`."""
        if device.view_key:
            loops.unbind(device)

    def disconnect(self, volume_id: str) -> None:
        check_volume_id(volume_id)
        if self._record(volume_id) is None and not self._record_path(volume_id).exists():
            return
        self._disconnect_record(volume_id)
        self._record_path(volume_id).unlink(missing_ok=True)
        log.info("disconnected volume %s (nvme-tcp)", volume_id)

    def _disconnect_record(self, volume_id: str) -> None:
        target = self._target(volume_id)
        if target is not None:
            nvme_host.disconnect(target)

    def extend(self, device: BlockDevice, min_size_bytes: int = 0) -> None:
        """Rescan: the namespace shows the file's new size online; views follow it."""
        if device.view_key:
            if blockdev.size_bytes(device.backing) > loops.size_bytes(device):
                loops.refresh(device)
            return
        target = self._target(device.volume_id)
        if target is None:
            return
        nvme_host.rescan(target)
        deadline = time.monotonic() + GROW_WAIT
        while blockdev.size_bytes(device.path) < min_size_bytes:
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"volume {device.volume_id}: {device.path} still shows "
                    f"{blockdev.size_bytes(device.path)} bytes after a rescan, not "
                    f"{min_size_bytes}; the owner may not have grown its file yet",
                    field="volume_id",
                )
            time.sleep(0.05)

    # ---- records -------------------------------------------------------------------

    def _record_path(self, volume_id: str) -> Path:
        return self.dir / f"{check_volume_id(volume_id)}.json"

    def _write_record(
        self, volume_id: str, connection: Connection, digest: str, identity: str
    ) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = {
            "connection": connection.model_dump(mode="json"),
            "key_digest": digest,
            "identity": identity,
        }
        tmp = self.dir / f".{volume_id}.json.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, self._record_path(volume_id))

    def _record(self, volume_id: str) -> tuple[Connection, str, str] | None:
        """(connection, key digest, identity); None when absent or unreadable."""
        try:
            data = json.loads(self._record_path(volume_id).read_text())
            return (
                Connection.model_validate(data["connection"]),
                str(data["key_digest"]),
                str(data["identity"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _target(self, volume_id: str) -> nvme_host.Target | None:
        record = self._record(volume_id)
        if record is None:
            return None
        connection, _, identity = record
        try:
            return target_of(
                volume_id, connection.owner_node, connection.host, connection.port, identity
            )
        except FailedPrecondition:
            return None  # its host name does not resolve now: nothing to find by address


def _check_connection(volume_id: str, connection: Connection) -> None:
    """host, port, owner and the subsystem this volume's owner exports: nothing else."""
    if not connection.host or not connection.port or not connection.owner_node:
        raise InvalidArgument(
            "publish_context of an nvme-tcp volume needs host, port and owner "
            "(from ControllerPublishVolume)",
            field="publish_context",
        )
    check_node_id(connection.owner_node, "publish_context.ownerNode")
    expected = subsystem_nqn(volume_id, connection.owner_node)
    if connection.subsystem_nqn != expected:
        raise InvalidArgument(
            f"publish_context subsystemNqn {connection.subsystem_nqn[:230]!r} is not volume "
            f"{volume_id}'s export on node {connection.owner_node} ({expected})",
            field="publish_context",
        )


def _key_digest(key: Path) -> str:
    try:
        return hashlib.sha256(key.read_bytes()).hexdigest()[:16]
    except OSError:
        return ""
