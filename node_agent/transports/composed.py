"""The composed transport: a volume made of legs on several nodes, put together here.

Every leg in `Connection.legs` is attached (a loop device on this node's
leg file when the leg is local; a remote leg is an nvme-tcp namespace, or a
kernel nbd device through a local TLS bridge, node_agent/transports/nbd_kernel.py),
then:

- raid0: a device-mapper `striped` device `tessera-<volume-id>` over the
  legs in index order (tessera.system.dm): no metadata, the table is the
  stored geometry;
- raid1 / raid10: the md array whose UUID is `Connection.array_uuid`
  (tessera.system.md). Created only when no leg carries any signature at all
  (every leg a fresh, zero, sparse file); otherwise assembled from exactly
  the listed legs that carry this array's superblock and are not stale
  (events behind the newest): never --scan, never a device not listed,
  never a create over data.

State per volume, `<state-dir>/composed/<volume-id>/record.json` (0700):
the connection as assembled (legs included), the mode, which listed legs
were left out as stale, the md array's kernel name, and a digest of the key
(never the key). The kernel is the rest of the record: the dm device by
name, the md array by the UUID in its members' superblocks, local legs by
their loop label, nvme-tcp legs by subsystem and host NQN in sysfs, nbd legs
by their client's bridge socket (`nbd-leg-<index>/` in the volume's
directory, /sys/block/nbdN/pid). So an
agent restarted at any point adopts exactly what is there, and a repeated
connect or disconnect converges.

A re-publish whose legs differ (a repair placed a new leg) is reconciled
without touching the device above: the new leg is connected and added (md
recovers it; `condition` shows the progress), a leg no longer listed is
failed, removed and disconnected.

Read-only views are loop devices on the composed device, tagged like every
view (node_agent/transports/loops.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import mmap
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from node_agent.pools import Pool
from node_agent.transports import BlockDevice, loops, refuse_reconnect_while_held
from node_agent.transports.nbd_kernel import MIRROR, SINGLE, KernelNbdClient
from node_agent.transports.nvme_tcp import read_key, target_of
from tessera import layouts
from tessera.errors import FailedPrecondition, Internal, InvalidArgument, NotFound, Unavailable
from tessera.ids import check_volume_id, is_volume_id
from tessera.models import Connection, Layout, LegConnection, Transport
from tessera.nvme_names import subsystem_nqn
from tessera.system import blockdev, dm, filesystems, loopdev, md, nvme_host

log = logging.getLogger(__name__)

RECORD = "record.json"
#: how long a remote leg gets to show its grown size after a rescan
GROW_WAIT = 15.0
MD_DIR = Path("/dev/md")
#: an nbd leg's client directory in the volume's: `nbd-leg-<index>`
NBD_LEG = "nbd-leg-"
#: what a leg must read before md assembles from it
PROBE_BYTES = 4096


@dataclass(frozen=True)
class Record:
    """What was composed: the connection as assembled, and what the kernel cannot say."""

    connection: Connection
    readonly: bool
    key_digest: str = ""
    array: str = ""  # md: the array's kernel name (md127) when last seen
    stale: tuple[int, ...] = ()  # listed legs left out: their superblock is behind
    identity: str = ""  # this node's id in the key: remote legs' host NQN (kept past the key)
    adding: tuple[int, ...] = ()  # legs a re-publish is adding (redone after a crash)

    def leg(self, index: int) -> LegConnection | None:
        return next((leg for leg in self.connection.legs if leg.index == index), None)


class ComposedTransport:
    name = Transport.COMPOSED.value

    def __init__(
        self, pools: dict[str, Pool], records_dir: Path, key_path: Callable[[str], Path]
    ) -> None:
        self.pools = pools
        self.dir = records_dir
        self.key_path = key_path

    @classmethod
    def from_state_dir(
        cls, pools: dict[str, Pool], state_dir: Path, key_path: Callable[[str], Path]
    ) -> ComposedTransport:
        return cls(pools, state_dir / "composed", key_path)

    # ---- connect ---------------------------------------------------------------

    def connect(self, volume_id: str, connection: Connection, readonly: bool) -> BlockDevice:
        """Attach every leg (a mirror carries on without an unreachable remote leg),
        then make (or adopt) the composed device at the legs' real size."""
        check_volume_id(volume_id)
        check_connection(volume_id, connection)
        previous = self._read(volume_id)
        connection = applied_connection(volume_id, connection, previous)
        identity, secret = self._key(volume_id, connection)
        if previous is not None:  # legs of the old record not in this one: no leak
            self._detach_dropped(volume_id, previous, connection)
        record = Record(
            connection, readonly, self._key_digest(volume_id, connection), identity=identity
        )
        self._write(volume_id, record)  # first: a crash from here on is cleaned up by disconnect
        legs = self._attach_legs(volume_id, connection, identity, secret)
        if layouts.is_mirrored(connection.layout):
            md.ensure_modules(connection.layout)
            record = self._compose_md(volume_id, record, legs)
        else:
            dm.ensure_module()
            self._compose_dm(volume_id, connection, legs, readonly)
        self._write(volume_id, record)
        device = self._device(volume_id, record)
        if device is None:
            raise Internal(f"volume {volume_id} was composed but its device is not there")
        if not readonly:  # legs grown while it was not attached here (expand, then re-stage)
            self._grow_to_legs(device, record, legs)
        log.info(
            "composed volume %s (%s over %d legs) as %s%s",
            volume_id,
            connection.layout.value,
            len(legs),
            device.path,
            " (read-only)" if readonly else "",
        )
        return device

    def _attach_legs(
        self, volume_id: str, connection: Connection, identity: str, secret: str
    ) -> dict[int, str]:
        """Every leg's device; a mirror's remote leg that cannot be reached is left out
        (md runs degraded without it) as long as md can still run."""
        legs: dict[int, str] = {}
        unreachable: list[str] = []
        for leg in connection.legs:
            try:
                path = self._attach_leg(volume_id, leg, connection.layout, identity, secret)
                if leg.transport != Transport.LOOP and layouts.is_mirrored(connection.layout):
                    check_readable(path, f"leg {leg.index} (node {leg.node_id})")
                legs[leg.index] = path
            except Unavailable as err:
                if leg.transport == Transport.LOOP or not layouts.is_mirrored(connection.layout):
                    raise
                unreachable.append(f"leg {leg.index} (node {leg.node_id})")
                log.warning("volume %s: leg %d (node %s) left out: %s",
                            volume_id, leg.index, leg.node_id, err)  # fmt: skip
        if unreachable and not md_can_run(connection.layout, len(connection.legs), set(legs)):
            raise Unavailable(
                f"volume {volume_id}: {', '.join(unreachable)} cannot be reached and the "
                f"{connection.layout.value} array cannot run without it",
                field="connection.legs",
            )
        return legs

    def _detach_dropped(self, volume_id: str, previous: Record, connection: Connection) -> None:
        """Disconnect the legs `previous` attached that `connection` no longer lists."""
        want = {leg.index: leg for leg in connection.legs}
        for leg in previous.connection.legs:
            if leg.index in want and not _moved(leg, want[leg.index]):
                continue
            if leg.transport == Transport.LOOP and any(
                w.transport == Transport.LOOP for w in want.values()
            ):
                continue  # the local leg stays this node's leg
            self._detach_leg(volume_id, leg, previous.identity)
            log.warning("volume %s: leg %d (node %s) of the previous connection disconnected",
                        volume_id, leg.index, leg.node_id)  # fmt: skip

    def _compose_dm(
        self, volume_id: str, connection: Connection, legs: dict[int, str], readonly: bool
    ) -> None:
        table = dm.striped_table(
            [dm.device_number(legs[i]) for i in sorted(legs)],
            connection.chunk_bytes,
            striped_bytes(
                [blockdev.size_bytes(legs[i]) for i in sorted(legs)],
                connection.chunk_bytes,
                connection.data_bytes,
            ),
        )
        name = dm.dm_name(volume_id)
        if dm.find(name) is not None:
            if dm.table(name) == table:
                return  # made before a crash: adopt
            dm.remove(name)  # from another publish, and nothing above it (no device of ours)
        dm.create(name, dm.dm_uuid(volume_id), table, readonly)

    def _grow_to_legs(self, device: BlockDevice, record: Record, legs: dict[int, str]) -> None:
        """An array whose legs are larger than it uses (grown while detached) uses them."""
        if not layouts.is_mirrored(record.connection.layout) or not legs:
            return
        data = min(blockdev.size_bytes(p) for p in legs.values()) - layouts.MD_DATA_OFFSET
        if data > md_component_bytes(os.path.basename(device.path)):
            md.grow(device.path)

    def _compose_md(self, volume_id: str, record: Record, legs: dict[int, str]) -> Record:
        connection = record.connection
        udev_settle()  # udev's incremental assembly may be busy with a leg that just appeared
        members, stale, blank = plan_md(volume_id, connection, legs)
        array = _adoptable(find_array(connection.array_uuid), legs, stale)
        for held in _arrays_holding(legs.values()) if array is None else []:
            # udev's incremental assembly of a leg (inactive while a leg is missing): stopped
            array = array or _adoptable(held, legs, stale)
        if array is None:
            self._make_array(volume_id, record, legs, members)
            array = find_array(connection.array_uuid)
            if array is None:
                raise Internal(f"md array {connection.array_uuid} is not running after mdadm")
        if record.readonly:
            md.set_readonly(f"/dev/{array}")
        elif members:  # a new leg that a crash kept from being added (reconcile adds the rest)
            present = set(md.member_names(array))
            for index in blank:
                if _kernel_name(legs[index]) not in present:
                    md.add(f"/dev/{array}", legs[index])
        return _with(record, array=array, stale=stale)

    def _make_array(
        self, volume_id: str, record: Record, legs: dict[int, str], members: list[int]
    ) -> None:
        """Create on blank legs (no member anywhere), else assemble exactly the members."""
        connection = record.connection
        if not members and record.readonly:
            raise FailedPrecondition(
                f"volume {volume_id} was never written: no leg carries its md array "
                f"{connection.array_uuid}; publish it read-write first",
                field="readonly",
            )
        if members:
            md.assemble(
                self._md_path(volume_id),
                connection.array_uuid,
                [legs[i] for i in sorted(members)],
                record.readonly,
            )
            return
        absent = [leg for leg in connection.legs if leg.index not in legs]
        if absent:
            raise Unavailable(
                f"volume {volume_id}: its md array is made on every leg, and "
                + ", ".join(f"leg {leg.index} (node {leg.node_id})" for leg in absent)
                + " cannot be reached",
                field="connection.legs",
            )
        md.create(
            self._md_path(volume_id),
            connection.array_uuid,
            md.md_name(volume_id),
            connection.layout,
            [legs[i] for i in sorted(legs)],
            layouts.leg_data_bytes(connection.layout, connection.data_bytes, len(connection.legs)),
            connection.chunk_bytes,
        )

    def _md_path(self, volume_id: str) -> str:
        return str(MD_DIR / md.md_name(volume_id))

    # ---- legs ------------------------------------------------------------------

    def _attach_leg(
        self, volume_id: str, leg: LegConnection, layout: Layout, identity: str, secret: str
    ) -> str:
        """The leg's block device, attached now or found attached (idempotent)."""
        if leg.transport == Transport.LOOP:
            found = self._local_leg(volume_id)
            if found is not None:
                return found
            return loops.bind(
                volume_id, str(self._leg_file(volume_id)), False, self.name, leg=True
            ).path
        if leg.transport == Transport.NBD:
            return self._attach_nbd_leg(volume_id, leg, layout, identity)
        target = self._target(volume_id, leg, identity)
        device = nvme_host.namespace_device(target)
        if device is not None and os.path.exists(device):
            ctrl = nvme_host.controller_of(target)
            if ctrl is not None:  # adopted: its key attributes 0600 as after a connect
                nvme_host.protect_secrets(ctrl.name)
            return device
        timeouts = nvme_host.MIRROR_LEG if layouts.is_mirrored(layout) else nvme_host.SINGLE_LEG
        nvme_host.connect(target, secret, timeouts)
        return nvme_host.wait_namespace(target)

    def _attach_nbd_leg(
        self, volume_id: str, leg: LegConnection, layout: Layout, identity: str
    ) -> str:
        """A kernel nbd device on the leg's export: a mirror leg fails fast (md carries
        on without it), a stripe leg waits for its node like a one-leg volume."""
        client = self._nbd_client(volume_id, leg)
        found = client.device()
        if found is not None:
            # a stripe leg is never probed: without a request timeout a read of a leg
            # behind a partition would wait for the network, holding the volume's lock
            if not layouts.is_mirrored(layout) or readable(found):
                return found
            # its owner went away since (a mirror leg's bridge never reconnects): try anew
            log.warning("volume %s: leg %d (node %s) on %s no longer reads: reconnecting",
                        volume_id, leg.index, leg.node_id, found)  # fmt: skip
            client.disconnect()
        return client.connect(
            leg.host,
            leg.port,
            self.key_path(volume_id),
            identity,
            readonly=False,  # md and dm need every leg read-write; a read-only view stays so
            timeouts=MIRROR if layouts.is_mirrored(layout) else SINGLE,
            what=f"volume {volume_id} leg {leg.index} (node {leg.node_id})",
        )

    def _leg_device(self, volume_id: str, leg: LegConnection, identity: str) -> str | None:
        """Where the leg is attached now; None when it is not."""
        if leg.transport == Transport.LOOP:
            return self._local_leg(volume_id)
        if leg.transport == Transport.NBD:
            return self._nbd_client(volume_id, leg).device()
        return nvme_host.namespace_device(self._target(volume_id, leg, identity))

    def _leg_member(self, volume_id: str, leg: LegConnection, identity: str) -> str | None:
        """The device md may hold for the leg: the attached one, or an nbd leg's device
        whose client died (the kernel keeps it while md holds it: still its member)."""
        if leg.transport == Transport.NBD:
            return self._nbd_client(volume_id, leg).claimed()
        return self._leg_device(volume_id, leg, identity)

    def _detach_leg(self, volume_id: str, leg: LegConnection, identity: str) -> None:
        if leg.transport == Transport.LOOP:
            for path in self._local_legs(volume_id):
                loops.unbind(BlockDevice(volume_id, path, "", False, self.name))
            return
        if leg.transport == Transport.NBD:
            self._nbd_client(volume_id, leg).disconnect()
            return
        nvme_host.disconnect(self._target(volume_id, leg, identity))

    def _nbd_client(self, volume_id: str, leg: LegConnection) -> KernelNbdClient:
        """The client of the leg in slot `leg.index` (its directory is in the volume's)."""
        return KernelNbdClient(self.dir / check_volume_id(volume_id) / f"{NBD_LEG}{leg.index}")

    def _nbd_homes(self, volume_id: str) -> list[Path]:
        """Every nbd leg client directory of the volume, listed in its record or not
        (a crash between making one and recording its leg)."""
        home = self.dir / volume_id
        if not home.is_dir():
            return []
        return sorted(p for p in home.iterdir() if p.name.startswith(NBD_LEG) and p.is_dir())

    def _local_legs(self, volume_id: str) -> list[str]:
        """Loop devices labelled as this volume's leg (normally one)."""
        label = loops.LEG_LABEL + volume_id
        found = []
        for bound in loopdev.bound_devices():
            try:
                if loopdev.read_label(bound.path) == label:
                    found.append(bound.path)
            except OSError:
                continue  # unbound meanwhile
        return found

    def _local_leg(self, volume_id: str) -> str | None:
        found = self._local_legs(volume_id)
        return found[0] if found else None

    def _leg_file(self, volume_id: str) -> Path:
        for pool in self.pools.values():
            path = pool.volume_path(volume_id)
            if path.is_file():
                return path
        raise NotFound(f"volume {volume_id} has a leg on this node but it is in no pool here")

    def _target(self, volume_id: str, leg: LegConnection, identity: str) -> nvme_host.Target:
        """The leg's nvme target, reached as this node (`identity`: the key's node id)."""
        return target_of(volume_id, leg.node_id, leg.host, leg.port, identity)

    def _key(self, volume_id: str, connection: Connection) -> tuple[str, str]:
        """(this node's id, DH-HMAC-CHAP secret) from the attachment's key; ("", "")
        when every leg is local (no key is handed over for those)."""
        if all(leg.transport == Transport.LOOP for leg in connection.legs):
            return "", ""
        return read_key(self.key_path(volume_id), volume_id)

    # ---- reconcile (a re-publish with other legs) -------------------------------

    def reconcile(self, device: BlockDevice, connection: Connection) -> None:
        """Make the assembled legs the listed ones: add new legs (md recovers them),
        fail, remove and disconnect legs no longer listed. Nothing else changes."""
        if device.view_key:
            return
        check_connection(device.volume_id, connection)
        record = self._read(device.volume_id)
        if record is None:
            raise Internal(f"volume {device.volume_id} is composed here but has no record")
        if connection.generation < record.connection.generation:
            log.warning(
                "volume %s: legs of generation %d are older than the applied %d: kept",
                device.volume_id, connection.generation, record.connection.generation,
            )  # fmt: skip
            return
        had = {leg.index: leg for leg in record.connection.legs}
        want = {leg.index: leg for leg in connection.legs}
        gone = [i for i in had if i not in want or _moved(had[i], want[i])]
        new = [i for i in want if i not in had or _moved(had[i], want[i])]
        mirrored = layouts.is_mirrored(record.connection.layout)
        if (gone or new) and not mirrored:
            raise FailedPrecondition(
                f"volume {device.volume_id} is striped ({record.connection.layout.value}): "
                "its legs cannot change while it is attached",
                field="connection.legs",
            )
        array = (record.array or find_array(record.connection.array_uuid) or "") if mirrored else ""
        if gone and array:
            self._check_keeps_a_copy(device.volume_id, record, array, gone)
        for index in gone:
            self._drop_leg(device.volume_id, record, array, had[index])
        stale = tuple(i for i in record.stale if i in want and i not in new)
        identity, secret = self._key(device.volume_id, connection)
        # legs to add: the new ones, and any a crash kept from being added last time
        adding = tuple(sorted({*new, *(i for i in record.adding if i in want)})) if mirrored else ()
        record = _with(record, connection=connection, array=array, stale=stale, adding=adding)
        record = _with(record, identity=record.identity or identity)
        self._write(device.volume_id, record)  # the new list is the record from here
        if not adding or record.readonly:
            return
        for index in adding:
            self._add_leg(device.volume_id, record, want[index], secret)
        self._write(device.volume_id, _with(record, adding=()))

    def _check_keeps_a_copy(
        self, volume_id: str, record: Record, array: str, gone: list[int]
    ) -> None:
        """Refused, changing nothing: dropping `gone` would take the last in-sync copy."""
        members = self._member_legs(volume_id, record)
        in_sync = {
            members[m.name] for m in md.state(array).members if m.in_sync and m.name in members
        }
        layout, count = record.connection.layout, len(record.connection.legs)
        kept = in_sync - set(gone)
        if in_sync and not md_can_run(layout, count, kept):
            last = sorted(set(gone) & in_sync)
            names = ", ".join(f"leg {i} (node {record.leg(i).node_id})" for i in last)  # type: ignore[union-attr]
            raise FailedPrecondition(
                f"volume {volume_id}: {names} holds the last in-sync copy of its data; "
                "not removing it",
                field="connection.legs",
            )

    def _drop_leg(self, volume_id: str, record: Record, array: str, leg: LegConnection) -> None:
        path = self._leg_member(volume_id, leg, record.identity)
        if path is not None and array:
            md.fail_and_remove(array, os.path.basename(os.path.realpath(path)))
        elif array:
            for member in _missing_members(array):
                md.fail_and_remove(array, member)
        self._detach_leg(volume_id, leg, record.identity)
        log.warning("volume %s: leg %d (node %s) removed", volume_id, leg.index, leg.node_id)

    def _add_leg(self, volume_id: str, record: Record, leg: LegConnection, secret: str) -> None:
        layout = record.connection.layout
        path = self._attach_leg(volume_id, leg, layout, record.identity, secret)
        kernel = os.path.basename(os.path.realpath(path))
        array = record.array
        if kernel in md.member_names(array):
            return  # added before a crash
        check_blank(path, f"leg {leg.index} (node {leg.node_id})")
        md.add(f"/dev/{array}", path)
        log.warning(
            "volume %s: leg %d (node %s) added, resyncing", volume_id, leg.index, leg.node_id
        )

    # ---- state -------------------------------------------------------------------

    def devices(self) -> list[BlockDevice]:
        """Composed devices with a record, and the views (loops) on them."""
        found: list[BlockDevice] = []
        paths: dict[str, str] = {}
        for volume_id in self._recorded():
            record = self._read(volume_id)
            if record is None:
                continue
            device = self._device(volume_id, record)
            if device is not None:
                found.append(device)
                paths[device.path] = volume_id
        if paths:
            found += loops.bound(paths.get, self.name)
        return found

    def _device(self, volume_id: str, record: Record) -> BlockDevice | None:
        if layouts.is_mirrored(record.connection.layout):
            array = self._array_of(record)
            if array is None:
                return None
            return BlockDevice(
                volume_id,
                f"/dev/{array}",
                f"md:{record.connection.array_uuid}",
                record.readonly,
                self.name,
            )
        path = dm.find(dm.dm_name(volume_id))
        if path is None:
            return None
        return BlockDevice(
            volume_id, path, f"dm:{dm.dm_name(volume_id)}", record.readonly, self.name
        )

    def _array_of(self, record: Record) -> str | None:
        """The array's kernel name: the recorded one when its members still say so."""
        if record.array and _array_uuid(record.array) == record.connection.array_uuid:
            return record.array
        return find_array(record.connection.array_uuid)

    def connection_of(self, device: BlockDevice) -> Connection:
        record = self._read(device.volume_id)
        if record is None:
            raise Internal(f"volume {device.volume_id} has a composed device but no record")
        return record.connection

    def is_current(self, device: BlockDevice, connection: Connection) -> bool:
        """The same array (UUID, layout) with the key this publish delivered; other legs
        are reconciled, not a reason to replace the device."""
        record = self._read(device.volume_id)
        if record is None:
            return False
        had = record.connection
        if (had.layout, had.array_uuid, had.chunk_bytes) != (
            connection.layout,
            connection.array_uuid,
            connection.chunk_bytes,
        ):
            return False
        if connection.generation < had.generation:
            return True  # an old publish_context: never a reason to re-make it from old legs
        return not record.key_digest or record.key_digest == self._key_digest(
            device.volume_id, connection
        )

    def connections(self) -> dict[str, float]:
        """Composed volumes with a remote leg (what management may take back), by record time."""
        found = {}
        for volume_id in self._recorded():
            record = self._read(volume_id)
            if record is None or any(
                leg.transport != Transport.LOOP for leg in record.connection.legs
            ):
                home = self.dir / volume_id
                try:  # a half-made one (no record yet) counts from its directory
                    found[volume_id] = (home / RECORD if record else home).stat().st_mtime
                except FileNotFoundError:
                    continue  # disconnected meanwhile
        return found

    def condition(self, device: BlockDevice, probe: bool = False) -> str:
        record = self._read(device.volume_id)
        if record is None:
            return "the record of this composed volume is gone"
        if device.view_key:
            return ""
        if layouts.is_mirrored(record.connection.layout):
            array = self._array_of(record)
            if array is None:
                return f"md array {record.connection.array_uuid} is not running"
            return md_condition(
                md.state(array), record, self._member_legs(device.volume_id, record)
            )
        return self._dm_condition(device.volume_id, record)

    def _member_legs(self, volume_id: str, record: Record) -> dict[str, int]:
        """Member kernel name -> leg index, for the legs attached now (or attached and dead:
        md holds a failed nbd leg's device until it is removed)."""
        found = {}
        for leg in record.connection.legs:
            path = self._leg_member(volume_id, leg, record.identity)
            if path is not None:
                found[os.path.basename(os.path.realpath(path))] = leg.index
        return found

    def _dm_condition(self, volume_id: str, record: Record) -> str:
        problems = []
        for leg in sorted(record.connection.legs, key=lambda leg: leg.index):
            if leg.transport == Transport.LOOP:
                if self._local_leg(volume_id) is None:
                    problems.append(f"leg {leg.index} ({leg.node_id}): its loop device is gone")
                continue
            if leg.transport == Transport.NBD:
                why = self._nbd_client(volume_id, leg).condition()
            else:
                why = nvme_host.condition(self._target(volume_id, leg, record.identity))
            if why:
                problems.append(f"leg {leg.index} ({leg.node_id}): {why}")
        return "; ".join(problems)

    def size_bytes(self, device: BlockDevice) -> int:
        return blockdev.size_bytes(device.path)

    # ---- views -------------------------------------------------------------------

    def add_view(self, primary: BlockDevice, view_key: str) -> BlockDevice:
        return loops.bind(primary.volume_id, primary.path, True, self.name, view_key)

    # ---- release / disconnect ----------------------------------------------------

    def release(self, device: BlockDevice) -> None:
        """A view's loop, or the composed device itself (stopped / removed)."""
        if device.view_key:
            loops.unbind(device)
        elif device.backing.startswith("md:"):
            md.stop(device.path)
        else:
            dm.remove(dm.dm_name(device.volume_id))

    def disconnect(self, volume_id: str) -> None:
        """Whatever is left of the volume here: its device, every leg, the record."""
        check_volume_id(volume_id)
        record = self._read(volume_id)
        if record is None:
            if (self.dir / volume_id).is_dir():
                self._remove_home(volume_id)
            return
        device = self._device(volume_id, record)
        if device is not None:
            self.release(device)
        self._stop_inactive_arrays(volume_id, record)
        for leg in record.connection.legs:
            self._detach_leg(volume_id, leg, record.identity)
        _remove_md_link(md.md_name(volume_id))
        self._remove_home(volume_id)
        log.info("disconnected composed volume %s", volume_id)

    def _stop_inactive_arrays(self, volume_id: str, record: Record) -> None:
        """An inactive array udev made of our legs (a connect that failed after a leg
        appeared) holds them: stopped too, so nothing is left."""
        if not layouts.is_mirrored(record.connection.layout):
            return
        paths = [
            path
            for leg in record.connection.legs
            if (path := self._leg_member(volume_id, leg, record.identity)) is not None
        ]
        for name in _arrays_holding(paths):
            if md.state(name).array_state == "inactive" and not blockdev.holders(f"/dev/{name}"):
                md.stop(f"/dev/{name}")

    # ---- extend ------------------------------------------------------------------

    def extend(self, device: BlockDevice, min_size_bytes: int = 0) -> None:
        """Every leg shows its grown size, then the composed device grows over them."""
        if device.view_key:
            if loops.size_bytes(device) < blockdev.size_bytes(device.backing):
                loops.refresh(device)
            return
        record = self._read(device.volume_id)
        if record is None:
            raise Internal(f"volume {device.volume_id} has a composed device but no record")
        connection = record.connection
        if self._nbd_legs_short(device.volume_id, record, min_size_bytes):
            device = self._reconnect(device, record)
            record = self._read(device.volume_id) or record
        legs = self._refreshed_legs(device.volume_id, record, min_size_bytes)
        if layouts.is_mirrored(connection.layout):
            data = min(blockdev.size_bytes(p) for p in legs.values()) - layouts.MD_DATA_OFFSET
            if data > md_component_bytes(os.path.basename(device.path)):
                md.grow(device.path)
            return
        table = dm.table(dm.dm_name(device.volume_id))
        if table is None:
            raise Internal(f"{dm.dm_name(device.volume_id)} no longer has a striped table")
        grown = grown_table(
            table, [blockdev.size_bytes(p) for p in legs.values()], connection.chunk_bytes
        )
        if grown is not None:
            dm.reload(dm.dm_name(device.volume_id), grown)

    def _nbd_legs_short(self, volume_id: str, record: Record, min_size_bytes: int) -> bool:
        """Whether an nbd leg shows less than `min_size_bytes` needs: NBD fixes an
        export's size when the client connects, so only a reconnect shows more."""
        if not min_size_bytes:
            return False
        connection = record.connection
        want = layouts.leg_size(connection.layout, min_size_bytes, len(connection.legs))
        for leg in connection.legs:
            if leg.transport == Transport.NBD:
                path = self._nbd_client(volume_id, leg).device()
                if path is not None and blockdev.size_bytes(path) < want:
                    return True
        return False

    def _reconnect(self, device: BlockDevice, record: Record) -> BlockDevice:
        """Put the volume together again over freshly connected legs, which only a
        device nothing holds allows (no mount, no view, nothing stacked)."""
        views = [d for d in self.devices() if d.volume_id == device.volume_id and d.view_key]
        refuse_reconnect_while_held(device, views, "has legs attached over nbd")
        self.disconnect(device.volume_id)
        return self.connect(device.volume_id, record.connection, record.readonly)

    def _refreshed_legs(
        self, volume_id: str, record: Record, min_size_bytes: int
    ) -> dict[int, str]:
        """Each attached leg after it was told to look at its size again; with
        `min_size_bytes`, waits until every leg shows what that size needs."""
        connection = record.connection
        want = 0
        if min_size_bytes:
            want = layouts.leg_size(connection.layout, min_size_bytes, len(connection.legs))
        legs = {}
        for leg in connection.legs:
            path = self._leg_device(volume_id, leg, record.identity)
            if path is None:
                continue  # a missing leg: md carries on without it, condition says so
            if leg.transport == Transport.LOOP:
                loops.refresh_if_grown(
                    BlockDevice(volume_id, path, str(self._leg_file(volume_id)), False, self.name)
                )
            elif leg.transport == Transport.NVME_TCP:
                nvme_host.rescan(self._target(volume_id, leg, record.identity))
            legs[leg.index] = path
        if not legs:
            raise Unavailable(
                f"volume {volume_id}: none of its legs is attached", field="volume_id"
            )
        deadline = time.monotonic() + GROW_WAIT
        while want and any(blockdev.size_bytes(p) < want for p in legs.values()):
            if time.monotonic() > deadline:
                small = [f"leg {i} ({p})" for i, p in legs.items() if blockdev.size_bytes(p) < want]
                raise Unavailable(
                    f"volume {volume_id}: {', '.join(small)} did not grow to {want} bytes "
                    f"within {GROW_WAIT:g} s",
                    field="volume_id",
                )
            time.sleep(0.1)
        return legs

    # ---- records -----------------------------------------------------------------

    def _recorded(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(e.name for e in self.dir.iterdir() if is_volume_id(e.name))

    def _key_digest(self, volume_id: str, connection: Connection) -> str:
        if all(leg.transport == Transport.LOOP for leg in connection.legs):
            return ""
        try:
            return hashlib.sha256(self.key_path(volume_id).read_bytes()).hexdigest()[:16]
        except OSError:
            return ""

    def _write(self, volume_id: str, record: Record) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        home = self.dir / volume_id
        home.mkdir(mode=0o700, exist_ok=True)
        data = {
            "connection": record.connection.model_dump(mode="json"),
            "readonly": record.readonly,
            "key_digest": record.key_digest,
            "array": record.array,
            "stale": list(record.stale),
            "identity": record.identity,
            "adding": list(record.adding),
        }
        tmp = home / f"{RECORD}.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, home / RECORD)

    def _read(self, volume_id: str) -> Record | None:
        try:
            data = json.loads((self.dir / volume_id / RECORD).read_text())
            return Record(
                Connection.model_validate(data["connection"]),
                bool(data["readonly"]),
                str(data.get("key_digest", "")),
                str(data.get("array", "")),
                tuple(int(i) for i in data.get("stale", [])),
                str(data.get("identity", "")),
                tuple(int(i) for i in data.get("adding", [])),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _remove_home(self, volume_id: str) -> None:
        home = self.dir / volume_id
        for client in self._nbd_homes(volume_id):  # one a crash left out of the record too
            KernelNbdClient(client).disconnect()
        for name in (RECORD, f"{RECORD}.tmp"):
            (home / name).unlink(missing_ok=True)
        try:
            home.rmdir()  # never recursive
        except FileNotFoundError:
            pass


# ---- pure logic (tested on the host) ------------------------------------------------


def check_connection(volume_id: str, connection: Connection) -> None:
    """What composition needs from management, refused naming the field."""
    layout = connection.layout
    if layout == Layout.CONCAT:
        raise InvalidArgument(
            "a composed connection needs layout raid0, raid1 or raid10", field="connection.layout"
        )
    fewest, most = layouts.LEG_RANGE[layout]
    if not fewest <= len(connection.legs) <= most:
        raise InvalidArgument(
            f"layout {layout.value} takes {fewest} to {most} legs, not {len(connection.legs)}",
            field="connection.legs",
        )
    indexes = [leg.index for leg in connection.legs]
    if len(set(indexes)) != len(indexes):
        raise InvalidArgument("two legs have the same index", field="connection.legs")
    if len({leg.node_id for leg in connection.legs}) != len(indexes):
        raise InvalidArgument("two legs are on the same node", field="connection.legs")
    if layouts.is_mirrored(layout) and not connection.array_uuid:
        raise InvalidArgument(
            f"layout {layout.value} needs array_uuid", field="connection.array_uuid"
        )
    if layouts.is_striped(layout) and not connection.chunk_bytes:
        raise InvalidArgument(
            f"layout {layout.value} needs chunk_bytes", field="connection.chunk_bytes"
        )
    if connection.data_bytes <= 0:
        raise InvalidArgument(
            "a composed connection needs data_bytes", field="connection.data_bytes"
        )
    if layout == Layout.RAID0 and sorted(indexes) != list(range(len(indexes))):
        raise InvalidArgument("a striped volume needs every leg 0..n-1", field="connection.legs")
    for leg in connection.legs:
        if leg.transport != Transport.LOOP:
            _check_remote_leg(volume_id, leg)


def _check_remote_leg(volume_id: str, leg: LegConnection) -> None:
    where = f"leg {leg.index} (node {leg.node_id})"
    if leg.transport not in (Transport.NVME_TCP, Transport.NBD):
        raise InvalidArgument(
            f"{where} comes over {leg.transport.value}: remote legs of a composed volume "
            "come over nvme-tcp or nbd",
            field="connection.legs",
        )
    if not (leg.host and leg.port):
        raise InvalidArgument(f"{where} needs host and port", field="connection.legs")
    if leg.transport == Transport.NBD:
        if leg.subsystem_nqn:
            raise InvalidArgument(
                f"{where} comes over nbd and names an nvme subsystem", field="connection.legs"
            )
        return
    expected = subsystem_nqn(volume_id, leg.node_id)
    if leg.subsystem_nqn and leg.subsystem_nqn != expected:
        raise InvalidArgument(
            f"{where}: subsystem_nqn {leg.subsystem_nqn[:230]!r} is not volume {volume_id}'s "
            f"export on node {leg.node_id} ({expected})",
            field="connection.legs",
        )


def plan_md(
    volume_id: str, connection: Connection, legs: dict[int, str]
) -> tuple[list[int], tuple[int, ...], list[int]]:
    """(legs to assemble, stale legs left out, blank legs to add after) for an array that is
    not running. No member at all: create (every leg was checked blank). Refused: a leg
    with another array's superblock or any other signature, and an array with no fresh leg."""
    supers = {i: md.examine(path) for i, path in legs.items()}
    ours = {i: sb for i, sb in supers.items() if sb is not None}
    for index, sb in ours.items():
        if sb.array_uuid != connection.array_uuid:
            raise FailedPrecondition(
                f"volume {volume_id}: leg {index} ({legs[index]}) belongs to md array "
                f"{sb.array_uuid}, not {connection.array_uuid}; not touching it",
                field="connection.legs",
            )
    blank = [i for i in sorted(legs) if i not in ours]
    for index in blank:
        check_blank(legs[index], f"volume {volume_id}: leg {index}")
    if not ours:
        return [], (), []
    newest = max(ours.values(), key=lambda sb: sb.events)
    stale = tuple(sorted(i for i, sb in ours.items() if md.is_stale(sb, newest)))
    for index in stale:
        log.warning(
            "volume %s: leg %d (%s) is stale (events %d, newest %d): not assembled",
            volume_id, index, legs[index], ours[index].events, newest.events,
        )  # fmt: skip
    members = [i for i in sorted(ours) if i not in stale]
    return members, stale, blank


def applied_connection(volume_id: str, connection: Connection, record: Record | None) -> Connection:
    """The connection to apply: one older (generation) than the record's keeps the record's
    legs, so a stale publish_context cannot undo a repair; no record: as given."""
    if record is None or connection.generation >= record.connection.generation:
        return connection
    had = record.connection
    if (had.layout, had.array_uuid) != (connection.layout, connection.array_uuid):
        return connection  # another volume's array: nothing of the record applies
    log.warning(
        "volume %s: connection of generation %d is older than the applied %d: its legs kept",
        volume_id, connection.generation, had.generation,
    )  # fmt: skip
    return connection.model_copy(update={"legs": had.legs, "generation": had.generation})


def striped_bytes(leg_sizes: list[int], chunk_bytes: int, data_bytes: int) -> int:
    """A striped device's length: whole chunks of the smallest leg on every leg (grown legs
    are used), never less than the volume's size (the kernel refuses legs too small)."""
    per_leg = min(leg_sizes) // chunk_bytes * chunk_bytes
    return max(per_leg * len(leg_sizes), data_bytes)


def md_can_run(layout: Layout, legs: int, present: set[int]) -> bool:
    """Whether md can run a mirrored array with only the legs (slots) `present`: raid1 with
    any one; raid10 (near 2: chunk copies on slots 2k, 2k+1 mod n) with no pair all gone."""
    if layout == Layout.RAID1:
        return bool(present)
    if layout == Layout.RAID10:
        pairs = {(2 * k % legs, (2 * k + 1) % legs) for k in range(legs)}
        return all(a in present or b in present for a, b in pairs)
    return len(present) == legs


def check_blank(path: str, what: str) -> None:
    """Only a device with no signature at all may be made part of an array."""
    found = filesystems.probe_filesystem(path)
    if found is not None:
        raise FailedPrecondition(
            f"{what} ({path}) carries {found}; refusing to make it part of an array",
            field="connection.legs",
        )


def md_condition(state: md.ArrayState, record: Record, members: dict[str, int]) -> str:
    """The volume's condition from its array: empty when every listed leg is in sync."""
    legs = {leg.index: leg for leg in record.connection.legs}
    problems: list[str] = []
    by_index = {members[m.name]: m for m in state.members if m.name in members}
    recovering = []
    for index, leg in sorted(legs.items()):
        where = f"leg {index} ({leg.node_id})"
        member = by_index.get(index)
        if index in record.stale:
            problems.append(f"{where} is stale: not assembled")
        elif member is None:
            problems.append(f"{where} missing")
        elif member.faulty:
            problems.append(f"{where} failed")
        elif not member.in_sync:
            recovering.append(where)
    parts = [f"degraded: {', '.join(problems)}"] if problems else []
    done = state.sync_completed
    percent = f"{100 * done[0] // done[1]}%" if done else "0%"
    if recovering:
        parts += [f"resyncing {where}: {percent}" for where in recovering]
    elif state.sync_action == "resync" and done:
        parts.append(f"resyncing: {percent}")
    if not parts and state.degraded:
        parts.append(f"degraded: {state.degraded} member(s) missing")
    return "; ".join(parts)


def grown_table(table: dm.Striped, leg_sizes: list[int], chunk_bytes: int) -> dm.Striped | None:
    """The table over legs grown to `leg_sizes` (whole chunks of the smallest); None when
    it would not be longer."""
    per_leg = min(leg_sizes) // chunk_bytes * chunk_bytes
    length = per_leg * len(table.devices) // dm.SECTOR
    if length <= table.length:
        return None
    return dm.Striped(length, table.chunk, table.devices)


def _adoptable(array: str | None, legs: dict[int, str], stale: tuple[int, ...]) -> str | None:
    """A running array of ours made of nothing but our fresh legs (made before a crash,
    or by udev's incremental assembly) is adopted; anything else with our UUID (half
    assembled, other devices, a stale leg) is stopped, to be assembled again exactly."""
    if array is None:
        return None
    ours = {_kernel_name(p) for i, p in legs.items() if i not in stale}
    members = set(md.member_names(array))
    if md.state(array).array_state != "inactive" and members and members <= ours:
        return array
    held = blockdev.holders(f"/dev/{array}")
    if held:
        raise FailedPrecondition(
            f"md array {array} has this volume's UUID but other members "
            f"({', '.join(sorted(members))}) and is in use: {'; '.join(held)}",
            field="connection.array_uuid",
        )
    log.warning("stopping %s (members %s) to assemble it exactly", array, sorted(members))
    md.stop(f"/dev/{array}")
    return None


def _arrays_holding(paths: Iterable[str]) -> list[str]:
    """md arrays holding any of these devices (sysfs holders): udev's `mdadm --incremental`
    takes a leg into an array that stays inactive while a mirror's leg is missing, and
    the superblock UUID of such an array is not always readable to find it by."""
    found: set[str] = set()
    for path in paths:
        holders = md.SYS_BLOCK / _kernel_name(path) / "holders"
        try:
            found.update(n for n in os.listdir(holders) if n.startswith("md"))
        except OSError:
            continue
    return sorted(found)


def _kernel_name(path: str) -> str:
    return os.path.basename(os.path.realpath(path))


def udev_settle() -> None:
    """Wait (briefly) for udev to finish with new devices; no udev is fine."""
    try:
        subprocess.run(
            ["udevadm", "settle", "--timeout=10"], capture_output=True, check=False, timeout=15
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        pass


def md_component_bytes(array: str) -> int:
    """The data per member md uses now (`component_size`, KiB)."""
    text = (md.SYS_BLOCK / array / "md" / "component_size").read_text().strip()
    return int(text) * 1024


def find_array(array_uuid: str) -> str | None:
    """The kernel name of the md array with this UUID (its members' superblocks say)."""
    for name in md.arrays():
        if _array_uuid(name) == array_uuid:
            return name
    return None


def _array_uuid(name: str) -> str | None:
    return md.array_uuid(name)


def readable(device: str) -> bool:
    """Whether the device's first 4 KiB read (O_DIRECT: the leg, never a cache)."""
    buf = mmap.mmap(-1, PROBE_BYTES)
    try:
        fd = os.open(device, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return os.preadv(fd, [buf], 0) == PROBE_BYTES
    except OSError:
        return False
    finally:
        os.close(fd)
        buf.close()


def check_readable(device: str, what: str) -> None:
    """A remote mirror leg that answers every read with an error (its node died while a
    client stayed up) is no leg to assemble from: Unavailable, so md runs without it."""
    if not readable(device):
        raise Unavailable(f"{what} on {device} does not read", field="connection.legs")


def _missing_members(array: str) -> list[str]:
    """Members whose device is gone (a deleted controller's namespace)."""
    return [m for m in md.member_names(array) if not os.path.exists(f"/dev/{m}")]


def _moved(had: LegConnection, want: LegConnection) -> bool:
    """Another leg in the same slot: a repair placed it on another node."""
    return had.node_id != want.node_id


def _with(record: Record, **changes: object) -> Record:
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


def _remove_md_link(name: str) -> None:
    """mdadm's /dev/md/<name> symlink, once it leads nowhere (no udev removed it)."""
    link = MD_DIR / name
    if link.is_symlink() and not link.exists():
        link.unlink(missing_ok=True)
