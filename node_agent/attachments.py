"""Attach and detach volumes on this node, behind stable symlinks.

A volume attached here is a transport device (a loop device today) plus a
symlink `<dev_dir>/<volume-id>` pointing at it; consumers (the CSI driver)
only ever use the symlink. The kernel is the record of what is attached:
nothing is kept in memory, so after a restart the agent sees the same
devices and `recover()` only repairs symlinks. Live devices are never
detached on restart: the data path outlives the agent.

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
from node_agent.transports import BlockDevice, Transport
from tessera.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from tessera.ids import VIEW_KEY_PATTERN, check_volume_id, is_volume_id
from tessera.models import AgentAttachment, AgentView
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
        """Every device on the volume's file: the primary, its views, leftovers of a crash."""
        files = {str(p) for p in self._candidate_files(volume_id)}
        return [
            device
            for transport in self.transports.values()
            for device in transport.list_devices()
            if device.backing in files
        ]

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
        return self._describe(volume_id, primary, views)

    def list(self) -> list[AgentAttachment]:
        found = []
        for vid, devices in self._ours().items():
            primary, views = self._split(vid, devices)
            if primary is not None:
                found.append(self._describe(vid, primary, views))
        return found

    def _ours(self) -> dict[str, list[BlockDevice]]:
        """Volume id -> devices, for every device backed by a volume in our pools."""
        found: dict[str, list[BlockDevice]] = {}
        for transport in self.transports.values():
            for device in transport.list_devices():
                vid = self._volume_of(device.backing)
                if vid is not None:
                    found.setdefault(vid, []).append(device)
        return found

    def _volume_of(self, backing: str) -> str | None:
        for pool in self.pools.values():
            vid = pool.volume_id_of(backing)
            if vid is not None:
                return vid
        return None

    def _candidate_files(self, volume_id: str) -> list[Path]:
        """Where the volume's file is or was: derived, so it works after a delete too."""
        return [pool.volume_path(volume_id) for pool in self.pools.values()]

    def _existing_file(self, volume_id: str) -> Path:
        for path in self._candidate_files(volume_id):
            if path.is_file():
                return path
        raise NotFound(f"volume {volume_id} is not in any pool on this node")

    def _describe(
        self, volume_id: str, device: BlockDevice, views: list[BlockDevice]
    ) -> AgentAttachment:
        return AgentAttachment(
            volume_id=volume_id,
            device=str(self._link(volume_id)),
            backing_device=device.path,
            transport=device.transport,
            readonly=device.readonly,
            size_bytes=self.transports[device.transport].size_bytes(device.path),
            blank=_never_written(device),
            views={v.view_key: v.path for v in views},
        )

    # ---- attach / detach ---------------------------------------------------

    def attach(self, volume_id: str, readonly: bool) -> AgentAttachment:
        """Attach (or re-adopt) the volume; again with the same flags is a no-op."""
        volume_file = self._existing_file(volume_id)
        device, views = self._split(volume_id, self.devices_of(volume_id))
        if device is None:
            device = self.transports[LOCAL_TRANSPORT].attach(str(volume_file), readonly)
        elif device.readonly != readonly:
            mode = "read-only" if device.readonly else "read-write"
            raise AlreadyExists(
                f"volume {volume_id} is already attached {mode} as {device.path}",
                field="readonly",
            )
        for each in (device, *views):
            self._refresh_if_grown(each, volume_file)
        self._ensure_link(volume_id, device.path)
        return self._describe(volume_id, device, views)

    def refresh(self, volume_id: str) -> None:
        """After a resize: let every attached device (views too) see the new size."""
        for device in self.devices_of(volume_id):
            self._refresh_if_grown(device, Path(device.backing))

    def _refresh_if_grown(self, device: BlockDevice, volume_file: Path) -> None:
        transport = self.transports[device.transport]
        if transport.size_bytes(device.path) < volume_file.stat().st_size:
            transport.refresh_size(device.path)

    def detach(self, volume_id: str) -> None:
        """Release the volume's devices (views first) and its symlink; absent is fine.

        Refused while anything uses any of them: the kernel would only defer
        the detach of a mounted device, and a bind of a device node does not
        even do that, so the next attach could reuse the device under it.
        """
        check_volume_id(volume_id)
        devices = self.devices_of(volume_id)  # normally one; a crash could leave two
        for device in devices:
            _refuse_if_held(f"volume {volume_id}", device)
        for device in sorted(devices, key=lambda d: not d.view_key):
            self._unlink_if_points_to(volume_id, device.path)
            self.transports[device.transport].detach(device.path)
        self._remove_link(volume_id)

    def _unlink_if_points_to(self, volume_id: str, device: str) -> None:
        link = self._link(volume_id)
        if link.is_symlink() and os.readlink(link) == device:
            link.unlink(missing_ok=True)

    # ---- read-only views ---------------------------------------------------

    def attach_view(self, volume_id: str, key: str) -> AgentView:
        """A read-only device on the attached volume, one per key; again is a no-op."""
        check_view_key(key)
        volume_file = self._existing_file(volume_id)
        primary, views = self._split(volume_id, self.devices_of(volume_id))
        if primary is None:
            raise FailedPrecondition(
                f"volume {volume_id} is not attached on this node; attach it first",
                field="volume_id",
            )
        view = next((v for v in views if v.view_key == key), None)
        if view is None:
            view = self.transports[LOCAL_TRANSPORT].attach(str(volume_file), True, view_key=key)
        self._refresh_if_grown(view, volume_file)
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
            self.transports[view.transport].detach(view.path)

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
        """Re-adopt every device backed by our volumes; repair or drop symlinks.

        Views stay views (their label says so) and keep serving their
        targets. Never detaches anything: a pod may be doing I/O on these
        devices.
        """
        adopted = []
        live: dict[str, str] = {}
        for vid, devices in self._ours().items():
            primary, views = self._split(vid, devices)
            if primary is None:
                log.warning("volume %s has only views (%s) and no primary device", vid, views)
                continue
            live[vid] = primary.path
            self._ensure_link(vid, primary.path)
            adopted.append(self._describe(vid, primary, views))
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
