"""Frozen filesystems of attached volumes, each under a lease the agent keeps itself.

A caller (management cutting a snapshot) freezes, copies, thaws. If it
dies in between, a filesystem must not stay frozen under a pod: every
freeze carries a lease and a timer thaws when it runs out, whatever
happens to the caller. What is frozen is also written to the state
directory, so an agent that crashed with something frozen thaws it at
start; and `thaw_all` runs when the agent stops.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from node_agent.attachments import AttachmentManager
from tessera.models import AgentFreezeState
from tessera.system import freeze as fs_freeze
from tessera.system.mounts import mount_table

log = logging.getLogger(__name__)


class Freezes:
    def __init__(self, attachments: AttachmentManager, state_dir: Path) -> None:
        self.attachments = attachments
        self.state_dir = state_dir
        self._lock = threading.Lock()
        #: volume id -> (mountpoints we froze, the timer that thaws them)
        self._frozen: dict[str, tuple[list[str], threading.Timer]] = {}

    def freeze(self, volume_id: str, lease_seconds: float) -> AgentFreezeState:
        """Freeze every filesystem of the volume mounted on this node; again: a new lease."""
        with self._lock:
            held = self._frozen.pop(volume_id, None)
            if held is not None:
                held[1].cancel()
                mine = held[0]
            else:
                mine = []
            seen = self._mountpoints(volume_id)
            try:
                for mountpoint in seen:
                    if mountpoint in mine:
                        continue
                    # recorded first: a crash right after the ioctl still thaws at start
                    self._record(volume_id, [*mine, mountpoint])
                    if fs_freeze.freeze(mountpoint):
                        mine.append(mountpoint)
                if not mine:
                    (self.state_dir / volume_id).unlink(missing_ok=True)
            except OSError:
                self._thaw_list(volume_id, mine)
                raise
            if mine:
                timer = threading.Timer(lease_seconds, self._expire, (volume_id,))
                timer.daemon = True
                self._frozen[volume_id] = (mine, timer)
                timer.start()
            log.info("froze %s for %.1fs: %s", volume_id, lease_seconds, seen or "not mounted")
            return AgentFreezeState(volume_id=volume_id, frozen=bool(seen), mountpoints=seen)

    def thaw(self, volume_id: str) -> AgentFreezeState:
        """Thaw what `freeze` froze; not frozen is fine."""
        with self._lock:
            held = self._frozen.pop(volume_id, None)
            mine = held[0] if held else []
            if held:
                held[1].cancel()
            self._thaw_list(volume_id, mine)
            return AgentFreezeState(volume_id=volume_id, frozen=False, mountpoints=mine)

    def thaw_all(self) -> None:
        for volume_id in list(self._frozen):
            self.thaw(volume_id)

    def recover(self) -> list[str]:
        """At start: thaw what a crashed agent left frozen; the mountpoints thawed."""
        thawed = []
        if not self.state_dir.is_dir():
            return thawed
        with self._lock:
            for record in sorted(self.state_dir.iterdir()):
                try:
                    mountpoints = json.loads(record.read_text())
                except (OSError, ValueError):
                    mountpoints = []
                self._thaw_list(record.name, [str(m) for m in mountpoints])
                thawed.extend(mountpoints)
        return thawed

    def is_frozen(self, volume_id: str) -> bool:
        return volume_id in self._frozen

    def _expire(self, volume_id: str) -> None:
        log.warning("freeze lease of %s ran out: thawing", volume_id)
        try:
            self.thaw(volume_id)
        except Exception:  # noqa: BLE001 - a timer thread has nobody to raise to
            log.exception("thawing %s after its lease failed", volume_id)

    def _mountpoints(self, volume_id: str) -> list[str]:
        """One mountpoint per filesystem on the volume's devices (its primary and views).

        Only filesystem mounts, matched by device number: a bind of the device
        node (a block publish) lives on /dev's filesystem, which is not ours
        to freeze. Several mounts of one filesystem share a superblock: one
        freeze covers them all.
        """
        numbers = set()
        for device in self.attachments.devices_of(volume_id):
            try:
                rdev = os.stat(device.path).st_rdev
            except OSError:
                continue
            numbers.add(f"{os.major(rdev)}:{os.minor(rdev)}")
        picked: dict[str, str] = {}
        for mount in mount_table():
            if mount.device in numbers:
                picked.setdefault(mount.device, mount.mountpoint)
        return sorted(picked.values())

    def _thaw_list(self, volume_id: str, mountpoints: list[str]) -> None:
        for mountpoint in mountpoints:
            try:
                fs_freeze.thaw(mountpoint)
            except FileNotFoundError:
                continue  # unmounted meanwhile: unmounting a frozen fs thaws it... or fails
        (self.state_dir / volume_id).unlink(missing_ok=True)

    def _record(self, volume_id: str, mountpoints: list[str]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / f".{volume_id}.tmp"
        tmp.write_text(json.dumps(mountpoints))
        os.replace(tmp, self.state_dir / volume_id)
