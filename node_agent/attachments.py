"""Attach and detach volumes on this node, behind stable symlinks.

A volume attached here is a transport's device (a loop device on the
local file, or on the file nbdfuse makes of another node's export) plus a
symlink `<dev_dir>/<volume-id>` pointing at it; consumers (the CSI driver)
only ever use the symlink. The kernel and the transports' records are the
record of what is attached: nothing is kept in memory, so after a restart
the agent sees the same devices and `recover()` only repairs symlinks.
Live devices are never detached on restart: the data path outlives the
agent. Nothing here branches on the transport.

A volume may also have read-only *views*: extra read-only devices on the
same file, one per read-only block publish of a writable volume (a
read-only bind of a writable device node does not stop writes). A view is
tagged with its key in the kernel, so it is never mistaken for the primary
device, the one the symlink points at.

No device is released while anything uses it (`blockdev.holders`): a
stale bind of a released loop device would read the next volume bound to
it. Callers hold the volume's lock (see `tessera.locks`).
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path

from node_agent.pools import Pool
from node_agent.transports import BlockDevice, Transport, check_transport
from tessera.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from tessera.ids import VIEW_KEY_PATTERN, check_volume_id, is_volume_id
from tessera.models import AgentAttachment, AgentView, Connection
from tessera.system import blockdev, loopdev
from tessera.system import syscalls as linux

log = logging.getLogger(__name__)

DEFAULT_DEV_DIR = Path("/dev/tessera")
LOCAL_TRANSPORT = "loop"
TMP_PREFIX = ".tmp-"
# Fits a loop device's label with room to spare; the CSI plugin uses a hash.
_VIEW_KEY = re.compile(VIEW_KEY_PATTERN)


def check_view_key(key: str) -> str:
    if not _VIEW_KEY.fullmatch(key):  # `$` alone lets "key\n" through
        raise InvalidArgument(
            f"view key {key!r} must be 1-40 characters of a-z, 0-9 and '-'", field="view_key"
        )
    return key


class AttachmentManager:
    def __init__(
        self, pools: dict[str, Pool], dev_dir: Path, transports: dict[str, Transport]
    ) -> None:
        self.pools = pools
        self.dev_dir = dev_dir
        self.transports = transports
        dev_dir.mkdir(mode=0o755, parents=True, exist_ok=True)

    # ---- queries -----------------------------------------------------------

    def find(self, volume_id: str) -> BlockDevice | None:
        """The volume's primary device on this node (never a view), whichever transport."""
        return self._split(volume_id, self.devices_of(volume_id))[0]

    def devices_of(self, volume_id: str) -> list[BlockDevice]:
        """Every device of the volume: the primary, its views, leftovers of a crash."""
        return [d for d in self._all_devices() if d.volume_id == volume_id]

    def _all_devices(self) -> list[BlockDevice]:
        return [d for t in self.transports.values() for d in t.devices()]

    def _split(
        self, volume_id: str, devices: list[BlockDevice]
    ) -> tuple[BlockDevice | None, list[BlockDevice]]:
        """(primary, views): the primary is the device the symlink points at, else
        the first one that is not a view; a device the symlink points at is
        never a view, whatever its label says."""
        link = self._link(volume_id)
        linked = os.readlink(link) if link.is_symlink() else None
        candidates = [d for d in devices if d.path == linked] or [
            d for d in devices if not d.view_key
        ]
        primary = candidates[0] if candidates else None
        views = [d for d in devices if d.view_key and d != primary]
        return primary, views

    def get(self, volume_id: str) -> AgentAttachment:
        devices = self.devices_of(volume_id)
        primary, views = self._split(volume_id, devices)
        if primary is None:
            raise NotFound(f"volume {volume_id} is not attached on this node")
        return self._describe(primary, views, probe=True)

    def list(self) -> list[AgentAttachment]:
        found = []
        for vid, devices in self._by_volume().items():
            primary, views = self._split(vid, devices)
            if primary is not None:
                found.append(self._describe(primary, views))
        return found

    def _by_volume(self) -> dict[str, list[BlockDevice]]:
        found: dict[str, list[BlockDevice]] = {}
        for device in self._all_devices():
            found.setdefault(device.volume_id, []).append(device)
        return found

    def _describe(
        self, device: BlockDevice, views: list[BlockDevice], probe: bool = False
    ) -> AgentAttachment:
        transport = self.transports[device.transport]
        return AgentAttachment(
            volume_id=device.volume_id,
            device=str(self._link(device.volume_id)),
            backing_device=device.path,
            transport=device.transport,
            readonly=device.readonly,
            size_bytes=transport.size_bytes(device),
            blank=_never_written(device),
            views={v.view_key: v.path for v in views},
            condition=transport.condition(device, probe),
            connection=transport.connection_of(device),
        )

    # ---- attach / detach ---------------------------------------------------

    def attach(
        self,
        volume_id: str,
        readonly: bool,
        connection: Connection | None = None,
        min_size_bytes: int = 0,
    ) -> AgentAttachment:
        """Connect (or re-adopt) the volume; again with the same flags is a no-op.

        Without a `connection` the volume is local (loop), or already attached
        and this only lets its devices see a grown volume; `min_size_bytes`
        asks for that growth even where it costs a reconnect.
        """
        device, views = self._split(volume_id, self.devices_of(volume_id))
        if device is not None and connection is not None:
            device, views = self._drop_if_stale(device, views, connection)
        if device is None:
            connection = connection or Connection()
            transport = check_transport(connection.transport.value, self.transports)
            device = transport.connect(volume_id, connection, readonly)
        else:
            _check_same(device, readonly, connection)
            transport = self.transports[device.transport]
            # a composed volume re-published with other legs (a repair) adopts them in place
            reconcile = getattr(transport, "reconcile", None)
            if connection is not None and reconcile is not None:
                reconcile(device, connection)
            transport.extend(device, min_size_bytes)
            for view in views:
                transport.extend(view)
        device, views = self._split(volume_id, self.devices_of(volume_id))
        if device is None:
            raise NotFound(f"volume {volume_id} went away while it was attached")
        self._ensure_link(volume_id, device.path)
        return self._describe(device, views)

    def _drop_if_stale(
        self, device: BlockDevice, views: list[BlockDevice], connection: Connection
    ) -> tuple[BlockDevice | None, list[BlockDevice]]:
        """A device made from an older publish (the owner exported anew: another port, a
        new key) reaches a closed export: replace it, unless something still uses it."""
        transport = self.transports[device.transport]
        if device.transport != connection.transport.value:
            return device, views  # _check_same refuses it, naming both
        if transport.is_current(device, connection):
            return device, views
        had = transport.connection_of(device)
        for each in (device, *views):
            _refuse_if_held(
                f"volume {device.volume_id} (connected from an older publish, "
                f"{had.host}:{had.port})",
                each,
            )
        log.warning(
            "volume %s: replacing the device of an older publish (%s:%d)",
            device.volume_id, had.host, had.port,
        )  # fmt: skip
        self.detach(device.volume_id)
        return None, []

    def refresh(self, volume_id: str) -> None:
        """After a resize: let every attached device (views too) see the new size, where
        that needs no reconnect (a remote device grows at NodeExpandVolume or its next stage)."""
        for device in self.devices_of(volume_id):
            self.transports[device.transport].extend(device)

    def detach(self, volume_id: str) -> None:
        """Release the volume's devices (views first), its transport state, its symlink.

        Absent is fine. Refused while anything uses any device: the kernel
        would only defer the detach of a mounted device, and a bind of a
        device node does not even do that, so the next attach could reuse
        the device under it.
        """
        check_volume_id(volume_id)
        devices = self.devices_of(volume_id)  # normally one; a crash could leave two
        for device in devices:
            _refuse_if_held(f"volume {volume_id}", device)
        for device in sorted(devices, key=lambda d: not d.view_key):
            self._unlink_if_points_to(volume_id, device.path)
            self.transports[device.transport].release(device)
        for transport in self.transports.values():
            transport.disconnect(volume_id)
        self._remove_link(volume_id)

    def _unlink_if_points_to(self, volume_id: str, device: str) -> None:
        link = self._link(volume_id)
        if link.is_symlink() and os.readlink(link) == device:
            link.unlink(missing_ok=True)

    def forgettable(self, wanted: set[str], asked_at: float) -> list[str]:
        """Remote volumes management no longer attaches here (after a fence, say).

        Only connections made before `asked_at` (when the heartbeat that
        answered `wanted` was sent): a publish racing it must not be undone.
        Local volumes never: their data is here, and the owner's own
        attachment harms nobody.
        """
        return sorted(
            volume_id
            for transport in self.transports.values()
            for volume_id, since in transport.connections().items()
            if since < asked_at and volume_id not in wanted
        )

    def forget(self, volume_id: str, asked_at: float) -> bool:
        """Disconnect a volume management took back, unless something uses it.

        Looked at again under the volume's lock: a stage that finished since
        `forgettable` answered is newer than the heartbeat and stays. A
        mounted device stays until kubelet unstages it: its export is closed,
        so it can no longer write anyway.
        """
        if volume_id not in self.forgettable(set(), asked_at):
            return False
        try:
            self.detach(volume_id)
        except FailedPrecondition as err:
            log.warning("volume %s is no longer attached here but stays: %s", volume_id, err)
            return False
        log.warning("released volume %s: management no longer attaches it here", volume_id)
        return True

    # ---- read-only views ---------------------------------------------------

    def attach_view(self, volume_id: str, key: str) -> AgentView:
        """A read-only device on the attached volume, one per key; again is a no-op."""
        check_view_key(key)
        primary, views = self._split(volume_id, self.devices_of(volume_id))
        if primary is None:
            raise FailedPrecondition(
                f"volume {volume_id} is not attached on this node; attach it first",
                field="volume_id",
            )
        transport = self.transports[primary.transport]
        view = next((v for v in views if v.view_key == key), None)
        if view is None:
            view = transport.add_view(primary, key)
        else:
            transport.extend(view)
        return AgentView(volume_id=volume_id, key=key, device=view.path)

    def release_view(self, volume_id: str, key: str) -> None:
        """Detach the view with this key; absent is fine, in use is refused."""
        check_view_key(key)
        views = [
            v for v in self._split(volume_id, self.devices_of(volume_id))[1] if v.view_key == key
        ]
        for view in views:
            _refuse_if_held(f"view {key} of volume {volume_id}", view)
        for view in views:
            self.transports[view.transport].release(view)

    # ---- symlinks ----------------------------------------------------------

    def _link(self, volume_id: str) -> Path:
        return self.dev_dir / check_volume_id(volume_id)

    def _ensure_link(self, volume_id: str, device: str) -> None:
        """Point `<dev_dir>/<id>` at the device, atomically (temp symlink + rename)."""
        link = self._link(volume_id)
        if link.is_symlink() and os.readlink(link) == device:
            return
        if link.exists() and not link.is_symlink():
            raise FailedPrecondition(f"{link} exists and is not a symlink; not replacing it")
        tmp = self.dev_dir / f"{TMP_PREFIX}{volume_id}-{uuid.uuid4().hex[:8]}"
        os.symlink(device, tmp)
        try:
            os.replace(tmp, link)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        log.info("linked %s -> %s", link, device)

    def _remove_link(self, volume_id: str) -> None:
        """Remove the link if it is a symlink not pointing at a live device of this volume."""
        link = self._link(volume_id)
        if not link.is_symlink():
            return
        live = self.find(volume_id)
        if live is not None and os.readlink(link) == live.path:
            return
        link.unlink(missing_ok=True)
        log.info("removed %s", link)

    # ---- restart -----------------------------------------------------------

    def recover(self) -> list[AgentAttachment]:
        """Re-adopt every device of our volumes; repair or drop symlinks.

        Views stay views (their label says so) and keep serving their
        targets. Never detaches anything: a pod may be doing I/O on these
        devices.
        """
        adopted = []
        live: dict[str, str] = {}
        for vid, devices in self._by_volume().items():
            primary, views = self._split(vid, devices)
            if primary is None:
                log.warning("volume %s has only views (%s) and no primary device", vid, views)
                continue
            live[vid] = primary.path
            self._ensure_link(vid, primary.path)
            adopted.append(self._describe(primary, views))
        self._drop_stale_links(live)
        return adopted

    def _drop_stale_links(self, live: dict[str, str]) -> None:
        """A link to a device no longer ours could lead a consumer to someone else's data."""
        for entry in self.dev_dir.iterdir():
            if not entry.is_symlink():
                continue
            if entry.name.startswith(TMP_PREFIX):
                entry.unlink(missing_ok=True)
            elif is_volume_id(entry.name) and os.readlink(entry) != live.get(entry.name):
                log.warning("removing stale link %s -> %s", entry, os.readlink(entry))
                entry.unlink(missing_ok=True)


def _check_same(device: BlockDevice, readonly: bool, connection: Connection | None) -> None:
    """A second attach must ask for what is attached: same mode, same transport."""
    if device.readonly != readonly:
        mode = "read-only" if device.readonly else "read-write"
        raise AlreadyExists(
            f"volume {device.volume_id} is already attached {mode} as {device.path}",
            field="readonly",
        )
    if connection is not None and connection.transport.value != device.transport:
        raise AlreadyExists(
            f"volume {device.volume_id} is already attached over {device.transport}, "
            f"not {connection.transport.value}",
            field="connection.transport",
        )


def _refuse_if_held(what: str, device: BlockDevice) -> None:
    """FailedPrecondition (409) naming whatever still uses the device."""
    held = blockdev.holders(device.path)
    if held:
        raise FailedPrecondition(
            f"{what} ({device.path}) is in use: {'; '.join(held)}; release it first",
            field="volume_id",
        )


def _never_written(device: BlockDevice) -> bool:
    """True when nothing was ever written to the volume: every byte reads as zero.

    The file the loop device is really bound to (same device and inode) has
    no allocated blocks, checked again after flushing the device, so no
    write can be waiting in its page cache; and it lives on a filesystem
    whose st_blocks counts delayed allocations the moment fsync returns
    (ext4, xfs, btrfs, tmpfs; volume files are far too large for inline
    data). Anything else answers False and staging probes the device. A
    freshly provisioned volume is the common case, and this spares its
    first stage a signature probe. A file with data is answered from one
    stat, without touching its (maybe mounted) device.
    """
    if device.transport != LOCAL_TRANSPORT:
        return False
    try:
        if _allocated(device) != 0:
            return False
        fd = os.open(device.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return _allocated(device) == 0
    except OSError:
        return False  # cannot tell: the caller probes


def _allocated(device: BlockDevice) -> int | None:
    """Blocks of the device's backing file; None unless it is provably that file."""
    st = os.stat(device.backing)
    if linux.filesystem_magic(device.backing) not in linux.BLOCK_COUNTING_FILESYSTEMS:
        return None
    if loopdev.backing_identity(device.path) != (st.st_dev, st.st_ino):
        return None
    return st.st_blocks
