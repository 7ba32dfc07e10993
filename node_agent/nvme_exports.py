"""NVMe/TCP exports of this node's volumes (the owner side), beside the NBD ones.

An export to a client node is, in nvmet (tessera/system/nvmet.py): the
subsystem `subsystem_nqn(volume, this node)` with namespace 1 on the
volume file, the host `host_nqn(client, volume)` with the attachment's
key as its DH-HMAC-CHAP key, allowed on that subsystem, and the subsystem
served on this node's one port (--data-address/--export-address,
--nvme-port). nvmet has no per-host read-only mode, so a read-only
request is refused (management sends read-only attachments over NBD).

Records, in `<state-dir>/nvme-exports/<volume_id>/<client_node>.*`:
`json` (volume file, address, port) and `key` (the hex key, 0600). They
are written before configfs is touched and removed after it was cleaned,
so every configfs object of ours has a record that finds it, and a reboot
(configfs is empty after one) is repaired at start from the records. The
kernel does the serving: nothing runs that an agent restart could take
along.

`TransportExports` is the agent's `exports`: the NBD `Exports` it extends
(every NBD behaviour unchanged) plus these, dispatched by
AgentExportCreate.transport. An export of one (volume, client) exists over
one transport at a time: opening it over the other closes the first.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from node_agent.exports import Exports, load_record, record_paths
from node_agent.keys import write_private
from node_agent.transports.loops import EXPORT_LABEL
from tessera.errors import FailedPrecondition, Internal, InvalidArgument, TesseraError
from tessera.ids import check_node_id, check_volume_id
from tessera.models import AgentExport, AgentExportCreate, Transport
from tessera.nvme_names import dhchap_ctrl_secret, dhchap_secret, host_nqn, subsystem_nqn
from tessera.system import loopdev, nvmet
from tessera.system.udev import wait_for_device

log = logging.getLogger(__name__)

#: nvme-tcp's registered port, the default of --nvme-port
DEFAULT_NVME_PORT = 4420

Key = tuple[str, str]


@dataclass(frozen=True)
class NvmeRecord:
    volume_id: str
    client_node: str
    volume_file: str
    host: str
    port: int
    #: a new key was given and controllers that authenticated with the old one may
    #: still be connected: set before the key is written, cleared once they were
    #: dropped, so a crash in between still drops them on the retry
    rekey: bool = False

    def model(self, owner: str) -> AgentExport:
        return AgentExport(
            volume_id=self.volume_id,
            client_node=self.client_node,
            host=self.host,
            port=self.port,
            readonly=False,
            transport=Transport.NVME_TCP,
            subsystem_nqn=subsystem_nqn(self.volume_id, owner),
        )


class NvmeExports:
    """This node's nvmet exports; the caller holds the volume's lock around changes."""

    def __init__(
        self,
        directory: Path,
        owner_node: str,
        address: str,
        port: int = DEFAULT_NVME_PORT,
        configfs: Path = nvmet.CONFIGFS,
    ) -> None:
        self.directory = directory
        self.owner = owner_node
        self.address = address
        self.port = port
        self.configfs = configfs
        #: configfs changes one at a time: a close removing the port when it serves nothing
        #: must not race an open about to link a subsystem to it
        self._lock = threading.Lock()

    # ---- records -------------------------------------------------------------------

    def _file(self, volume_id: str, client_node: str, suffix: str) -> Path:
        return self.directory / volume_id / f"{client_node}.{suffix}"

    def _read(self, volume_id: str, client_node: str) -> NvmeRecord | None:
        return _load(self._file(volume_id, client_node, "json"))

    def records(self, volume_id: str | None = None) -> list[NvmeRecord]:
        found = (_load(path) for path in record_paths(self.directory, volume_id))
        return [record for record in found if record is not None]

    def has(self, volume_id: str, client_node: str) -> bool:
        return self._file(volume_id, client_node, "json").is_file()

    def list(self) -> list[AgentExport]:
        return [r.model(self.owner) for r in self.records()]

    def of_volume(self, volume_id: str) -> list[AgentExport]:
        return [r.model(self.owner) for r in self.records(volume_id)]

    def keys(self) -> list[Key]:
        return [(r.volume_id, r.client_node) for r in self.records()]

    # ---- the kernel ------------------------------------------------------------------

    def _target(self) -> nvmet.Nvmet:
        return nvmet.Nvmet(self.owner, nvmet.ensure_loaded(self.configfs))

    def _apply(self, record: NvmeRecord, key_hex: str) -> None:
        """Make configfs serve `record` (every step idempotent)."""
        target = self._target()
        subnqn = subsystem_nqn(record.volume_id, self.owner)
        hostnqn = host_nqn(record.client_node, record.volume_id)
        port = target.ensure_port(record.host, record.port)
        device = self._loop(record)
        for attempt in range(2):
            try:
                rekeyed = target.ensure_host(
                    hostnqn, dhchap_secret(key_hex), dhchap_ctrl_secret(key_hex)
                )
                target.ensure_subsystem(subnqn, Path(device))
                target.allow_host(subnqn, hostnqn)
                break
            except nvmet.ConfigfsError as err:
                # another owner sharing this kernel removed the (then unused) host
                # entry between our mkdir and its use: once more makes it again
                if err.errno != errno.ENOENT or attempt:
                    raise
                log.info("host entry %s vanished while it was set up; again", hostnqn)
        target.link_port(port, subnqn)
        if rekeyed or record.rekey:
            # a controller authenticated with the old key must not keep the volume
            target.bounce(subnqn, port)

    # ---- the export's loop device -----------------------------------------------------

    def _loops(self, volume_id: str, volume_file: str) -> list[str]:
        """This volume's export loop devices on `volume_file` (by label and backing file:
        owners sharing a kernel label alike, but their files differ)."""
        backing = os.path.realpath(volume_file)
        found = []
        for bound in loopdev.bound_devices():
            if bound.backing != backing:
                continue
            try:
                if loopdev.read_label(bound.path) == EXPORT_LABEL + volume_id:
                    found.append(bound.path)
            except OSError:
                continue  # unbound meanwhile
        return found

    def _loop(self, record: NvmeRecord) -> str:
        """The loop device nvmet serves the volume from: found again, or bound.

        Not the file itself: a file-backed namespace takes its block size from
        the pool's filesystem (4096), while loop and nbd attachments keep the
        pool's sector size (loopdev), and a 1 KiB-block ext4 made over one of
        those would not mount over nvme-tcp. The loop device has the geometry
        every other path has.
        """
        found = self._loops(record.volume_id, record.volume_file)
        if found:
            return found[0]
        try:
            device, _ = loopdev.attach(
                record.volume_file,
                readonly=False,
                direct_io=True,
                label=EXPORT_LABEL + record.volume_id,
            )
        except OSError as err:
            raise Internal(f"could not bind {record.volume_file} for nvmet: {err}") from None
        wait_for_device(device)
        log.info("bound %s as %s for nvmet", record.volume_file, device)
        return device

    def _release_loops(self, volume_id: str, record: NvmeRecord | None, served: str) -> None:
        """Detach the volume's export loop devices once no subsystem serves them."""
        devices = set(self._loops(volume_id, record.volume_file)) if record else set()
        try:
            if served.startswith("/dev/loop") and loopdev.read_label(served) == (
                EXPORT_LABEL + volume_id
            ):
                devices.add(served)
        except OSError:
            pass
        for device in sorted(devices):
            try:
                loopdev.detach(device)
            except OSError as err:
                raise Internal(f"could not detach {device} (volume {volume_id}): {err}") from None
            log.info("detached %s (nvmet no longer serves volume %s)", device, volume_id)

    def resized(self, volume_id: str) -> None:
        """After the file grew: the loop device and nvmet show the new size; connected
        hosts rescan on nvmet's event (or at their next rescan)."""
        records = self.records(volume_id)
        for device in self._loops(volume_id, records[0].volume_file) if records else []:
            try:
                loopdev.set_capacity(device)
            except OSError as err:
                raise Internal(f"could not refresh the size of {device}: {err}") from None
        root = self.configfs / "nvmet"
        if records and root.is_dir():
            nvmet.Nvmet(self.owner, root).revalidate(subsystem_nqn(volume_id, self.owner))

    def serving(self, record: NvmeRecord) -> bool:
        """Whether configfs serves `record` (subsystem enabled on a port, host allowed)."""
        root = self.configfs / "nvmet"
        if not root.is_dir():
            return False
        found = nvmet.Nvmet(self.owner, root).subsystem(subsystem_nqn(record.volume_id, self.owner))
        return (
            found is not None
            and found.enabled
            and bool(found.ports)
            and host_nqn(record.client_node, record.volume_id) in found.hosts
        )

    # ---- the API's operations ----------------------------------------------------------

    def open(
        self, volume_id: str, client_node: str, volume_file: Path, req: AgentExportCreate
    ) -> AgentExport:
        """Export the volume to `client_node` over nvme-tcp; again: the same export."""
        check_volume_id(volume_id)
        check_node_id(client_node, "client_node")
        if req.readonly:
            raise InvalidArgument(
                "readonly: nvmet has no per-host read-only mode; read-only attachments are "
                "exported over nbd",
                field="readonly",
            )
        if not self.address:
            raise FailedPrecondition(
                "this agent has no address to export on: start it with --export-address "
                "(or --listen/--advertise)"
            )
        old = self._read(volume_id, client_node)
        old_key = self._key(old) if old is not None else None
        record = NvmeRecord(
            volume_id=volume_id,
            client_node=client_node,
            volume_file=str(volume_file),
            host=nvmet.resolve(self.address),
            port=self.port,
            rekey=old is not None and (old.rekey or old_key != req.psk_key),
        )
        fresh = old is None
        write_private(self._file(volume_id, client_node, "json"), _dump(record))
        write_private(self._file(volume_id, client_node, "key"), req.psk_key.encode())
        try:
            with self._lock:
                self._apply(record, req.psk_key)
        except Exception:
            if fresh:  # nothing was promised before this call: leave nothing behind
                self.close(volume_id, client_node)
            raise
        if record.rekey:
            record = NvmeRecord(**{**asdict(record), "rekey": False})
            write_private(self._file(volume_id, client_node, "json"), _dump(record))
        log.info(
            "exported volume %s to node %s over nvme-tcp on %s:%d",
            volume_id,
            client_node,
            record.host,
            record.port,
        )
        return record.model(self.owner)

    def close(self, volume_id: str, client_node: str) -> None:
        """Revoke: the host is no longer allowed, its connections end; idempotent."""
        check_volume_id(volume_id)
        check_node_id(client_node, "client_node")
        record = self._read(volume_id, client_node)
        root = self.configfs / "nvmet"
        if root.is_dir():
            with self._lock:
                self._unserve(nvmet.Nvmet(self.owner, root), volume_id, client_node, record)
        self._remove(volume_id, client_node)
        if record is not None:
            log.info("closed nvme-tcp export of volume %s to node %s", volume_id, client_node)

    def _unserve(
        self, target: nvmet.Nvmet, volume_id: str, client_node: str, record: NvmeRecord | None
    ) -> None:
        subnqn = subsystem_nqn(volume_id, self.owner)
        hostnqn = host_nqn(client_node, volume_id)
        linked = target.disallow_host(subnqn, hostnqn)
        found = target.subsystem(subnqn)
        if found is None or not found.hosts:
            if found is not None:
                target.remove_subsystem(subnqn)  # no host left: nothing serves the file
            self._release_loops(volume_id, record, found.device_path if found else "")
        elif linked:
            # the revoked host's live controller ends now; only then: a bounce drops
            # every other client's connection of this volume too (mirror legs fail)
            target.bounce(subnqn, self._our_port(target))
        target.remove_host_if_unused(hostnqn)
        if self.address:
            try:
                target.remove_port_if_unused(nvmet.resolve(self.address), self.port)
            except FailedPrecondition:
                pass  # the address no longer resolves: no port of ours to find by it

    def _our_port(self, target: nvmet.Nvmet) -> Path | None:
        if not self.address:
            return None
        try:
            return target.find_port(nvmet.resolve(self.address), self.port)
        except FailedPrecondition:
            return None

    def _remove(self, volume_id: str, client_node: str) -> None:
        for suffix in ("key", "json"):
            self._file(volume_id, client_node, suffix).unlink(missing_ok=True)
        try:
            (self.directory / volume_id).rmdir()
        except OSError:
            pass

    # ---- lifecycle ---------------------------------------------------------------------

    def recover(self, volume_file_of: Callable[[str], Path | None]) -> list[AgentExport]:
        """At start: serve every record again (after a reboot configfs is empty); drop
        records whose volume or key is gone; remove our subsystems no record wants."""
        kept = []
        wanted: set[str] = set()
        for record in self.records():
            volume_file = volume_file_of(record.volume_id)
            key = self._key(record)
            if volume_file is None or key is None:
                log.warning(
                    "dropped the nvme-tcp export of volume %s to node %s: %s",
                    record.volume_id,
                    record.client_node,
                    "the volume is not on this node" if volume_file is None else "no key",
                )
                try:
                    self.close(record.volume_id, record.client_node)
                except (TesseraError, OSError, ValueError) as err:
                    log.error("could not close it: %s", err)
                continue
            # kept whether or not it serves again now: its live subsystem (other
            # clients, a transient failure) must not be swept below
            wanted.add(subsystem_nqn(record.volume_id, self.owner))
            moved = NvmeRecord(**{**asdict(record), "volume_file": str(volume_file)})
            kept.append(moved.model(self.owner))
            try:
                if moved != record:
                    write_private(
                        self._file(record.volume_id, record.client_node, "json"), _dump(moved)
                    )
                with self._lock:
                    self._apply(moved, key)
                if moved.rekey:
                    cleared = NvmeRecord(**{**asdict(moved), "rekey": False})
                    write_private(
                        self._file(record.volume_id, record.client_node, "json"), _dump(cleared)
                    )
            except (TesseraError, OSError, ValueError) as err:
                log.error(
                    "could not serve volume %s to node %s over nvme-tcp again: %s",
                    record.volume_id,
                    record.client_node,
                    err,
                )
        self._sweep(wanted)
        return kept

    def _sweep(self, wanted: set[str]) -> None:
        """Our subsystems without a record (a close that crashed half way): removed."""
        root = self.configfs / "nvmet"
        if not root.is_dir():
            return
        target = nvmet.Nvmet(self.owner, root)
        for found in target.subsystems():
            if found.nqn in wanted:
                continue
            try:
                target.remove_subsystem(found.nqn)
                self._release_loops(found.volume_id, None, found.device_path)
                for hostnqn in found.hosts:
                    target.remove_host_if_unused(hostnqn)
            except (TesseraError, OSError) as err:
                log.error("could not remove the unwanted subsystem %s: %s", found.nqn, err)

    def _key(self, record: NvmeRecord) -> str | None:
        try:
            key = self._file(record.volume_id, record.client_node, "key").read_text().strip()
        except OSError:
            return None
        return key if len(key) == 64 else None


class TransportExports(Exports):
    """The agent's exports: NBD (the base class, unchanged) and nvme-tcp (`nvme`)."""

    def __init__(
        self,
        directory: Path,
        address: str,
        ports: tuple[int, int],
        nvme: NvmeExports,
    ) -> None:
        super().__init__(directory, address, ports)
        self.nvme = nvme

    def open(
        self, volume_id: str, client_node: str, volume_file: Path, req: AgentExportCreate
    ) -> AgentExport:
        # the new export first, then the old one closes: a switch that fails keeps the old
        if req.transport == Transport.NVME_TCP:
            self._stamp((volume_id, client_node))  # see Exports.mark
            opened = self.nvme.open(volume_id, client_node, volume_file, req)
            if self._read(volume_id, client_node) is not None:
                super().close(volume_id, client_node)
                # the NBD close forgot the key's birth: stamped again, or a heartbeat
                # computed before this switch would reap the export just made
                self._stamp((volume_id, client_node))
            return opened
        if req.transport != Transport.NBD:
            raise InvalidArgument(
                f"transport: exports are nbd or nvme-tcp, not {req.transport.value}",
                field="transport",
            )
        opened = super().open(volume_id, client_node, volume_file, req)
        if self.nvme.has(volume_id, client_node):
            self.nvme.close(volume_id, client_node)
        return opened

    def close(self, volume_id: str, client_node: str) -> None:
        self.nvme.close(volume_id, client_node)
        super().close(volume_id, client_node)

    def list(self) -> list[AgentExport]:
        return super().list() + self.nvme.list()

    def resized(self, volume_id: str) -> None:
        """The volume's file grew: exports that hold a device on it show the new size."""
        self.nvme.resized(volume_id)

    def of_volume(self, volume_id: str) -> list[AgentExport]:
        return super().of_volume(volume_id) + self.nvme.of_volume(volume_id)

    def liveness(self) -> list[bool]:
        return super().liveness() + [self.nvme.serving(r) for r in self.nvme.records()]

    def unwanted(self, wanted: set[Key], mark: int) -> list[Key]:
        nvme = [k for k in self.nvme.keys() if k not in wanted and self._older_than(k, mark)]
        return super().unwanted(wanted, mark) + nvme

    def reap(self, volume_id: str, client_node: str, mark: int) -> bool:
        if self._older_than((volume_id, client_node), mark) and self.nvme.has(
            volume_id, client_node
        ):
            self.close(volume_id, client_node)
            log.info("volume %s to node %s was not wanted by management", volume_id, client_node)
            return True
        return super().reap(volume_id, client_node, mark)

    def recover(self, volume_file_of: Callable[[str], Path | None]) -> list[AgentExport]:
        return super().recover(volume_file_of) + self.nvme.recover(volume_file_of)


def _dump(record: NvmeRecord) -> bytes:
    return json.dumps(asdict(record)).encode()


def _load(path: Path) -> NvmeRecord | None:
    return load_record(path, NvmeRecord, "nvme export")
